//! The scripts behind every command that touches an entry this consumer
//! believes it holds: each first looks the id up in the consumer's pending
//! entries (see the module docs of `lease`) and only then claims,
//! acknowledges or dead-letters it, in one step.

use std::sync::LazyLock;

use redis::Script;

/// `KEYS[1]` stream; `ARGV` group, consumer, mode, idle ms, ids…
///
/// Claims those of `ids` still pending for `consumer`. Modes:
/// * `renew` — `XCLAIM … JUSTID`: resets their idle time, returns the ids;
/// * `reread` — `XCLAIM … JUSTID` then `XRANGE` each: the entries again
///   without raising their delivery counters (after a nack's delay);
/// * `recover` — plain `XCLAIM`: the entries, counters raised (what an
///   earlier run under this name left unsettled).
const CLAIM_OWNED: &str = r"
local owned = {}
for i = 5, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p > 0 then owned[#owned + 1] = ARGV[i] end
end
if #owned == 0 then return {} end
local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for _, id in ipairs(owned) do args[#args + 1] = id end
local mode = ARGV[3]
if mode ~= 'recover' then args[#args + 1] = 'JUSTID' end
local claimed = redis.call(unpack(args))
if mode ~= 'reread' then return claimed end
local entries = {}
for _, id in ipairs(claimed) do
  local found = redis.call('XRANGE', KEYS[1], id, id)
  if #found > 0 then entries[#entries + 1] = found[1] end
end
return entries
";

/// `KEYS[1]` stream; `ARGV` group, consumer, idle ms, then pairs of id and
/// retry count (empty: keep) — hands back those of the ids still pending for
/// `consumer`: `XCLAIM … IDLE <ms> [RETRYCOUNT n] JUSTID`, so any member's
/// next `XAUTOCLAIM` takes them. An entry whose delivery ended with an
/// outcome or never reached a handler gets its delivery counter set back by
/// one, since that `XAUTOCLAIM` raises it again; returns how many were
/// handed back.
const GIVE_BACK_OWNED: &str = r"
local given = 0
for i = 4, #ARGV, 2 do
  local id, retry = ARGV[i], ARGV[i + 1]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2])
  if #p > 0 then
    if retry == '' then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'JUSTID')
    else
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3],
        'RETRYCOUNT', retry, 'JUSTID')
    end
    given = given + 1
  end
end
return given
";

/// `KEYS[1]` stream, `KEYS[2]` the group's given-back hash; `ARGV` group,
/// consumer, idle ms, id, retry count, hash field, hash value, hash TTL in
/// seconds — gives `id` back to the group if it is still pending for
/// `consumer`: `XCLAIM … IDLE <ms> RETRYCOUNT <n> JUSTID`, so any member's
/// next `XAUTOCLAIM` takes it (the retry count set back by one, since that
/// claim raises it again: a give-back is not a delivery without an
/// outcome), and records how often and since when it was given back in the
/// hash (whose TTL each give-back renews). Returns 1 if so, 0 if not.
const GIVE_BACK_TO_GROUP: &str = r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[4], ARGV[4], 1, ARGV[2])
if #p == 0 then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[4], 'IDLE', ARGV[3],
  'RETRYCOUNT', ARGV[5], 'JUSTID')
redis.call('HSET', KEYS[2], ARGV[6], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[8])
return 1
";

/// `KEYS[1]` stream; `ARGV` group, consumer, lowest id, highest id, ids… —
/// acknowledges those of `ids` still pending for `consumer` with one `XACK`;
/// returns the (1-based) positions of those that were not, most often none.
///
/// Ownership is looked up with one `XPENDING … <lowest> <highest> <count>
/// <consumer>` over the batch's range (paged, in case the consumer holds
/// more in that range than the batch), not one per id: a batch costs three
/// commands however many ids it carries.
const ACK_OWNED: &str = r"
local wanted = {}
for i = 5, #ARGV do wanted[ARGV[i]] = true end
local owned = {}
local page = #ARGV - 4 + 64
local from = ARGV[3]
while true do
  local listed = redis.call('XPENDING', KEYS[1], ARGV[1], from, ARGV[4], page, ARGV[2])
  for _, entry in ipairs(listed) do
    if wanted[entry[1]] then owned[entry[1]] = true end
  end
  if #listed < page then break end
  from = '(' .. listed[#listed][1]
end
local ack = {'XACK', KEYS[1], ARGV[1]}
local lost = {}
for i = 5, #ARGV do
  if owned[ARGV[i]] then ack[#ack + 1] = ARGV[i] else lost[#lost + 1] = i - 4 end
end
if #ack > 3 then redis.call(unpack(ack)) end
return lost
";

/// `KEYS[1]` stream, `KEYS[2]` dead-letter stream; `ARGV` group, consumer,
/// id, the dead-letter stream's bound (0: none), then the dead-letter
/// entry's field/value pairs — adds the entry to the dead-letter stream
/// (trimmed to the bound) and acknowledges the original, only if `id` is
/// still pending for `consumer`; returns 0 if not, 1 if moved, 2 if moved
/// and the bound evicted older dead letters.
const DEAD_LETTER_OWNED: &str = r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #p == 0 then return 0 end
local bound = tonumber(ARGV[4])
local evicted = 0
local args = {'XADD', KEYS[2]}
if bound > 0 then
  if redis.call('XLEN', KEYS[2]) >= bound then evicted = 1 end
  args[#args + 1] = 'MAXLEN'
  args[#args + 1] = '='
  args[#args + 1] = ARGV[4]
end
args[#args + 1] = '*'
for i = 5, #ARGV do args[#args + 1] = ARGV[i] end
redis.call(unpack(args))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return 1 + evicted
";

pub(super) static CLAIM_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_OWNED));
pub(super) static ACK_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ACK_OWNED));
pub(super) static GIVE_BACK_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(GIVE_BACK_OWNED));
pub(super) static GIVE_BACK_TO_GROUP_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(GIVE_BACK_TO_GROUP));
pub(super) static DEAD_LETTER_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(DEAD_LETTER_OWNED));
