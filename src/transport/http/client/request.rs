//! One call's method, path (with parameters), query, headers and body.

use std::fmt::Display;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, Url};

use crate::error::{Error, ErrorKind};

/// One call of a [`JsonService`](crate::transport::http::JsonService) made with
/// [`JsonService::at`](crate::transport::http::JsonService::at): its method, a path below the
/// service's base URL with `{name}` parameters, query parameters, extra
/// headers and an optional JSON body — what `http::Request` is to a raw
/// HTTP service, for JSON.
///
/// [`get`](Self::get), [`delete`](Self::delete) and [`head`](Self::head)
/// carry no body (and the call sends no `Content-Type`);
/// [`post`](Self::post), [`put`](Self::put) and [`patch`](Self::patch)
/// carry one. Parameter values are percent-encoded, so a value holding `/`
/// or `?` stays inside its path segment or query value. A `{name}` without
/// a value, or a value for a name the path lacks, fails the call with
/// [`ErrorKind::Config`] (not retryable) before anything is sent.
///
/// ```
/// use switchboard::transport::http::JsonRequest;
///
/// let request = JsonRequest::get("/orders/{id}")
///     .with_param("id", 42)
///     .with_query("verbose", true);
/// let url = request.url("http://orders.internal:8080/api")?;
/// assert_eq!(url.as_str(), "http://orders.internal:8080/api/orders/42?verbose=true");
///
/// let odd = JsonRequest::get("/files/{name}").with_param("name", "a/b c");
/// assert_eq!(odd.url("http://files")?.path(), "/files/a%2Fb%20c");
/// # Ok::<(), switchboard::Error>(())
/// ```
// Not `Serialize`, on purpose: `JsonService`'s body-only impl covers every
// `Serialize` request, and this one's own impl may not overlap it.
#[derive(Debug, Clone)]
pub struct JsonRequest<B = ()> {
    method: Method,
    path: String,
    params: Vec<(String, String)>,
    query: Vec<(String, String)>,
    headers: HeaderMap,
    body: Option<B>,
}

impl JsonRequest<()> {
    /// A `GET` of `path`, without a body.
    pub fn get(path: impl Into<String>) -> Self {
        Self::new(Method::GET, path, None)
    }

    /// A `DELETE` of `path`, without a body.
    pub fn delete(path: impl Into<String>) -> Self {
        Self::new(Method::DELETE, path, None)
    }

    /// A `HEAD` of `path`: no body sent, none read (answer with `Resp = ()`).
    pub fn head(path: impl Into<String>) -> Self {
        Self::new(Method::HEAD, path, None)
    }
}

impl<B> JsonRequest<B> {
    /// A request with any method; `body` is sent as JSON when it is `Some`.
    pub fn new(method: Method, path: impl Into<String>, body: Option<B>) -> Self {
        Self {
            method,
            path: path.into(),
            params: Vec::new(),
            query: Vec::new(),
            headers: HeaderMap::new(),
            body,
        }
    }

    /// A `POST` of `body` to `path`.
    pub fn post(path: impl Into<String>, body: B) -> Self {
        Self::new(Method::POST, path, Some(body))
    }

    /// A `PUT` of `body` to `path`.
    pub fn put(path: impl Into<String>, body: B) -> Self {
        Self::new(Method::PUT, path, Some(body))
    }

    /// A `PATCH` of `body` to `path`.
    pub fn patch(path: impl Into<String>, body: B) -> Self {
        Self::new(Method::PATCH, path, Some(body))
    }

    /// Fills `{name}` in the path with `value`, percent-encoded.
    pub fn with_param(mut self, name: impl Into<String>, value: impl Display) -> Self {
        self.params.push((name.into(), value.to_string()));
        self
    }

    /// Appends `name=value` to the query string (both percent-encoded); a
    /// name may repeat.
    pub fn with_query(mut self, name: impl Into<String>, value: impl Display) -> Self {
        self.query.push((name.into(), value.to_string()));
        self
    }

    /// Sends `name: value` with this call (a signature, an idempotency key),
    /// replacing the service's own value of that header.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The path as given, before its parameters are filled.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The extra headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The body, if any.
    pub fn body(&self) -> Option<&B> {
        self.body.as_ref()
    }

    /// The URL this request goes to below `base`: the filled path appended
    /// (one `/` between them), then the query. Fails with
    /// [`ErrorKind::Config`] for a parameter missing or unused, or a URL that
    /// does not parse.
    pub fn url(&self, base: &str) -> Result<Url, Error> {
        let path = fill(&self.path, &self.params)?;
        let joined = match (base.ends_with('/'), path.starts_with('/')) {
            (true, true) => format!("{base}{}", &path[1..]),
            (false, false) if !path.is_empty() => format!("{base}/{path}"),
            _ => format!("{base}{path}"),
        };
        let mut url = Url::parse(&joined).map_err(|error| {
            Error::new(
                ErrorKind::Config,
                format!("HTTP: `{joined}` is not a URL: {error}"),
            )
            .with_source(error)
        })?;
        if !self.query.is_empty() {
            url.query_pairs_mut().extend_pairs(&self.query);
        }
        Ok(url)
    }

    /// The parts a call needs, the body taken out.
    pub(super) fn into_parts(self) -> (Method, HeaderMap, Option<B>) {
        (self.method, self.headers, self.body)
    }
}

/// `template` with each `{name}` replaced by its percent-encoded value.
fn fill(template: &str, params: &[(String, String)]) -> Result<String, Error> {
    let config = |message: String| Error::new(ErrorKind::Config, message);
    let mut filled = String::with_capacity(template.len());
    let mut used = vec![false; params.len()];
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        filled.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            return Err(config(format!(
                "HTTP: `{template}` has a `{{` without `}}`"
            )));
        };
        let name = &rest[open + 1..open + close];
        let Some(index) = params.iter().position(|(param, _)| param == name) else {
            return Err(config(format!(
                "HTTP: the path parameter `{name}` of `{template}` has no value"
            )));
        };
        used[index] = true;
        percent_encode_into(&params[index].1, &mut filled);
        rest = &rest[open + close + 1..];
    }
    filled.push_str(rest);
    if let Some(index) = used.iter().position(|used| !used) {
        return Err(config(format!(
            "HTTP: the path `{template}` has no `{{{}}}`",
            params[index].0
        )));
    }
    Ok(filled)
}

/// Percent-encodes every byte but RFC 3986's unreserved characters, so a
/// value is always one path segment.
fn percent_encode_into(value: &str, out: &mut String) {
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_join_the_base_with_one_slash() {
        for (base, path) in [
            ("http://h/api", "/x"),
            ("http://h/api/", "/x"),
            ("http://h/api", "x"),
            ("http://h/api/", "x"),
        ] {
            let url = JsonRequest::get(path).url(base).unwrap();
            assert_eq!(url.as_str(), "http://h/api/x", "{base} + {path}");
        }
        assert_eq!(
            JsonRequest::get("").url("http://h/a").unwrap().as_str(),
            "http://h/a"
        );
    }

    #[test]
    fn parameters_missing_unused_or_unclosed_are_config_errors() {
        for request in [
            JsonRequest::get("/orders/{id}"),
            JsonRequest::get("/orders").with_param("id", 1),
            JsonRequest::get("/orders/{id").with_param("id", 1),
        ] {
            let error = request.url("http://h").unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Config, "{error}");
            assert!(!error.is_retryable());
        }
    }

    #[test]
    fn query_values_are_encoded_and_may_repeat() {
        let url = JsonRequest::get("/s")
            .with_query("q", "a&b=c")
            .with_query("tag", 1)
            .with_query("tag", 2)
            .url("http://h")
            .unwrap();
        assert_eq!(url.query(), Some("q=a%26b%3Dc&tag=1&tag=2"));
    }
}
