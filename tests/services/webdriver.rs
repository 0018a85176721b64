//! A minimal WebDriver client over reqwest for the console's browser test:
//! starts Debian's `chromedriver` on a free port, opens headless Chromium,
//! and offers the few commands the test needs. The driver process is
//! killed (by its own handle) when the client is dropped.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

/// Where WebDriver's element references live in its answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The chromium binary and chromedriver, or why they are not here (after
/// `scripts/browser-deps` tried to install them).
pub fn find_browser() -> Result<(String, String), String> {
    let which = |name: &str| {
        Command::new("which")
            .arg(name)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let found = || which("chromium").zip(which("chromedriver"));
    if let Some(found) = found() {
        return Ok(found);
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/browser-deps");
    let installed = Command::new(script)
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    match found() {
        Some(found) if installed => Ok(found),
        _ => Err("chromium and chromedriver are not installed and scripts/browser-deps could not install them".into()),
    }
}

pub struct Browser {
    http: reqwest::Client,
    session: String,
    driver: Child,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The driver leads a process group of its own with the Chromium it
        // started: ending the group ends both, even after a failed test
        // that never closed the session.
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session that keeps the
    /// page's console log.
    pub async fn start(chromium: &str, chromedriver: &str, deadline: Duration) -> Self {
        let port = free_port();
        let mut driver = Command::new(chromedriver);
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut driver, 0);
        let driver = driver
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let http = reqwest::Client::new();
        let mut browser = Self {
            http,
            session: String::new(),
            driver,
        };
        let base = format!("http://127.0.0.1:{port}");
        tokio::time::timeout(deadline, async {
            loop {
                let ready = browser.http.get(format!("{base}/status")).send().await.ok();
                if let Some(response) = ready
                    && let Ok(status) = response.json::<Value>().await
                    && status["value"]["ready"] == true
                {
                    return;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("chromedriver answers /status");
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": [
                        "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--window-size=1280,1400"
                    ]
                },
                "goog:loggingPrefs": { "browser": "ALL" }
            }}
        });
        let answer: Value = browser
            .http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .expect("a new session")
            .json()
            .await
            .expect("a JSON answer");
        let session = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {answer}"));
        browser.session = format!("{base}/session/{session}");
        browser
    }

    async fn command(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Value> {
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("chromedriver answers");
        let ok = response.status().is_success();
        let answer: Value = response.json().await.expect("a JSON answer");
        if ok {
            Ok(answer["value"].clone())
        } else {
            Err(answer["value"].clone())
        }
    }

    pub async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await
            .expect("navigate");
    }

    /// Runs `script` in the page and returns what it returns.
    pub async fn eval(&self, script: &str) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .await
        .unwrap_or_else(|error| panic!("script {script:?} failed: {error}"))
    }

    /// Polls `script` until it returns something truthy (not null, false
    /// or ""); returns it. Panics with `what` past the deadline.
    pub async fn wait_for(&self, what: &str, deadline: Duration, script: &str) -> Value {
        tokio::time::timeout(deadline, async {
            loop {
                let value = self.eval(script).await;
                if !(value.is_null() || value == false || value == "") {
                    return value;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the page never showed {what}"))
    }

    /// Clicks the element `css` selects, finding it again when the page's
    /// refresh replaced it under the click.
    pub async fn click(&self, css: &str, deadline: Duration) {
        tokio::time::timeout(deadline, async {
            loop {
                if let Ok(element) = self.find(css).await {
                    let path = format!("/element/{element}/click");
                    if self
                        .command(reqwest::Method::POST, &path, Some(json!({})))
                        .await
                        .is_ok()
                    {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("could not click {css}"));
    }

    /// Types `text` into the element `css` selects.
    pub async fn type_into(&self, css: &str, text: &str) {
        let element = self
            .find(css)
            .await
            .unwrap_or_else(|error| panic!("{css}: {error}"));
        self.command(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        )
        .await
        .expect("typed");
    }

    async fn find(&self, css: &str) -> Result<String, Value> {
        let found = self
            .command(
                reqwest::Method::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await?;
        Ok(found[ELEMENT].as_str().unwrap_or_default().to_owned())
    }

    /// Waits for the page's `confirm()` and accepts it; returns its text.
    pub async fn accept_confirmation(&self, deadline: Duration) -> String {
        let text = tokio::time::timeout(deadline, async {
            loop {
                if let Ok(text) = self
                    .command(reqwest::Method::GET, "/alert/text", None)
                    .await
                {
                    return text.as_str().unwrap_or_default().to_owned();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("a confirmation dialog");
        self.command(reqwest::Method::POST, "/alert/accept", Some(json!({})))
            .await
            .expect("accepted");
        text
    }

    /// The browser console's entries since the last call.
    pub async fn console_log(&self) -> Vec<Value> {
        let body = Some(json!({ "type": "browser" }));
        let entries = match self
            .command(reqwest::Method::POST, "/se/log", body.clone())
            .await
        {
            Ok(entries) => entries,
            Err(_) => self
                .command(reqwest::Method::POST, "/log", body)
                .await
                .expect("the browser log"),
        };
        entries.as_array().cloned().unwrap_or_default()
    }

    /// A PNG of the window.
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let encoded = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .await
            .expect("a screenshot");
        base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().unwrap_or_default())
            .expect("base64 PNG")
    }

    pub async fn quit(&self) {
        let _ = self.command(reqwest::Method::DELETE, "", None).await;
    }
}
