//! Connection URLs without their secrets, for messages, logs and `Debug`.
//!
//! A URL's user-info (`user:password@`) is the only place the crate's
//! transports take a secret from a URL. It is cut from the text itself, not
//! from a parsed URL, because the URLs that most need it in a message are
//! the ones that do not parse (`amqp://u:secret@[::1`).

/// `url` with the password of its user-info replaced by `***`; the user
/// name stays, it helps find the account at fault. Text with no user-info
/// comes back as it is.
pub(crate) fn redact_url(url: &str) -> String {
    let (scheme_end, rest) = match url.find("://") {
        Some(at) => (at + 3, &url[at + 3..]),
        None => (0, url),
    };
    // The last `@` ends the user-info: a password may hold `@` itself.
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let user = rest[..at].split(':').next().unwrap_or_default();
    format!("{}{user}:***{}", &url[..scheme_end], &rest[at..])
}

/// `message` (a library's error text, which may quote the URL it could
/// not read) with every copy of `url` replaced by [`redact_url`]'s.
#[cfg_attr(not(any(feature = "amqp", feature = "grpc")), allow(dead_code))]
pub(crate) fn redact_in(message: &str, url: &str) -> String {
    if url.is_empty() {
        return message.to_owned();
    }
    message.replace(url, &redact_url(url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_password_goes() {
        assert_eq!(
            redact_url("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact_url("redis://:secret@h:x"), "redis://:***@h:x");
        assert_eq!(redact_url("amqp://u:sec@ret@[::1"), "amqp://u:***@[::1");
        assert_eq!(redact_url("u:secret@host"), "u:***@host");
        assert_eq!(redact_url("amqp://host"), "amqp://host");
    }

    #[test]
    fn a_quoted_url_is_redacted_inside_a_message() {
        let url = "amqp://u:secret@[::1";
        let message = format!("Invalid URL: '{url}'");
        assert_eq!(redact_in(&message, url), "Invalid URL: 'amqp://u:***@[::1'");
    }
}
