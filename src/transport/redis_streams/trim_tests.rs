//! Tests of the trim policies and the MINID computation.

use super::*;

fn group(last: (u64, u64), pending: Option<(u64, u64)>, stale: bool) -> GroupView {
    GroupView {
        last_delivered: EntryId(last.0, last.1),
        oldest_pending: pending.map(|(ms, seq)| EntryId(ms, seq)),
        stale,
    }
}

#[test]
fn ids_parse_and_order_like_redis() {
    assert_eq!(EntryId::parse("1700-3"), Some(EntryId(1700, 3)));
    assert_eq!(EntryId::parse("1700"), Some(EntryId(1700, 0)));
    assert_eq!(EntryId::parse("x-1"), None);
    assert!(EntryId(9, 10) > EntryId(9, 9), "numeric, not text, order");
    assert!(EntryId(10, 0) > EntryId(9, u64::MAX));
    assert_eq!(EntryId(9, u64::MAX).next(), EntryId(10, 0));
    assert_eq!(EntryId(1700, 3).to_string(), "1700-3");
}

#[test]
fn the_oldest_pending_entry_of_any_group_pins_the_trim() {
    let groups = [
        group((100, 0), Some((40, 2)), false),
        group((90, 0), Some((60, 0)), false),
    ];
    assert_eq!(min_needed(&groups), Some(EntryId(40, 2)));
}

#[test]
fn a_group_with_nothing_pending_needs_what_it_has_not_read() {
    let groups = [group((100, 0), None, false), group((70, 5), None, false)];
    assert_eq!(min_needed(&groups), Some(EntryId(70, 6)));
    // Pending above the unread point (cannot happen, but never trim
    // past what is unread).
    assert_eq!(
        min_needed(&[group((10, 0), Some((20, 0)), false)]),
        Some(EntryId(10, 1))
    );
}

#[test]
fn a_group_that_read_nothing_keeps_everything() {
    let groups = [group((100, 0), None, false), group((0, 0), None, false)];
    assert_eq!(min_needed(&groups), Some(EntryId(0, 1)));
}

#[test]
fn a_stale_group_does_not_pin_the_trim() {
    let groups = [
        group((100, 0), Some((5, 0)), true),
        group((90, 0), Some((80, 0)), false),
    ];
    assert_eq!(min_needed(&groups), Some(EntryId(80, 0)));
}

#[test]
fn with_only_stale_groups_unread_entries_stay() {
    let groups = [
        group((100, 0), Some((5, 0)), true),
        group((120, 0), None, true),
    ];
    assert_eq!(min_needed(&groups), Some(EntryId(120, 1)));
}

#[test]
fn without_groups_nothing_is_trimmed() {
    assert_eq!(min_needed(&[]), None);
}

#[test]
fn xinfo_replies_are_read_in_resp2_and_resp3() {
    let bulk = |t: &str| Value::BulkString(t.as_bytes().to_vec());
    let resp2 = Value::Array(vec![
        bulk("name"),
        bulk("g"),
        bulk("pending"),
        Value::Int(2),
    ]);
    let resp3 = Value::Map(vec![
        (bulk("name"), bulk("g")),
        (bulk("pending"), Value::Int(2)),
    ]);
    for reply in [resp2, resp3] {
        let fields = pairs(&reply);
        assert_eq!(fields.len(), 2);
        assert_eq!(text(fields[0].1).as_deref(), Some("g"));
        assert_eq!(int(fields[1].1), Some(2));
    }
}

#[test]
fn policies_refuse_impossible_values() {
    assert!(TrimPolicy::MaxLen(0).validate().is_err());
    assert!(TrimPolicy::max_age(Duration::ZERO).validate().is_err());
    assert!(
        TrimPolicy::KeepNeeded(KeepNeeded::every(Duration::ZERO))
            .validate()
            .is_err()
    );
    assert!(
        TrimPolicy::KeepNeeded(KeepNeeded::every(Duration::from_secs(1)).with_destroy_stale(true))
            .validate()
            .is_err()
    );
    assert!(
        TrimPolicy::max_age(Duration::from_secs(60))
            .validate()
            .is_ok()
    );
}
