//! A real `prefixd serve` process on 127.0.0.1 and a small HTTP client for it.

use prefixd::prefix::peft;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "test-admin-token";

/// Imports the three PEFT fixtures into `dir` as native files named after their case.
pub fn seed_prefixes(dir: &Path) {
    let engine = super::engine();
    for case in super::CASES {
        let file = peft::import_dir(
            &super::fixtures_dir().join(case),
            &Default::default(),
            engine.model_info(),
        )
        .unwrap();
        file.write(&dir.join(format!("{case}.safetensors")))
            .unwrap();
    }
}

pub struct Server {
    child: Option<Child>,
    pub base: String,
    pub dir: PathBuf,
    agent: ureq::Agent,
}

pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub text: String,
}

impl Server {
    /// Starts a server on a free port over `dir`, with the admin token (through its environment
    /// variable, so `extra` may override it) and the fixtures' truncation length.
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        Self::start_with(&super::model_dir(), dir, extra, |_| {})
    }

    /// The same over the tiny test model (see `tiny.rs`).
    pub fn start_tiny(dir: &Path, extra: &[&str]) -> Self {
        Self::start_with(&super::tiny::model_dir(), dir, extra, |_| {})
    }

    /// Starts a server over `model`; `adjust` may change the command (environment, limits).
    pub fn start_with(
        model: &Path,
        dir: &Path,
        extra: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        Self::start_from(model, dir.as_os_str(), dir, extra, adjust)
    }

    /// The same with `--prefixes <prefixes>` (a store URL, say), `dir` being its local folder.
    pub fn start_from(
        model: &Path,
        prefixes: &std::ffi::OsStr,
        dir: &Path,
        extra: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_prefixd"));
        cmd.arg("serve")
            .arg("--model")
            .arg(model)
            .arg("--device")
            .arg("cpu")
            .arg("--prefixes")
            .arg(prefixes)
            .args(["--addr", "127.0.0.1:0", "--max-length", "128"])
            .args(extra)
            .env("PREFIXD_ADMIN_TOKEN", TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        adjust(&mut cmd);
        let mut child = cmd.spawn().expect("prefixd serve starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let base = loop {
            let line = lines
                .next()
                .expect("server printed its address before exiting")
                .unwrap();
            if let Some(url) = line.strip_prefix("prefixd listening on ") {
                break url.trim().to_string();
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        Self {
            child: Some(child),
            base,
            dir: dir.to_path_buf(),
            agent,
        }
    }

    pub fn agent(&self) -> ureq::Agent {
        self.agent.clone()
    }

    /// `host:port` of the listener, for raw TCP.
    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Resident memory of the server process, in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        kb * 1024
    }

    fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
        let mut r = r.expect("HTTP exchange");
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply { status, body, text }
    }

    pub fn get(&self, path: &str) -> Reply {
        Self::reply(self.agent.get(format!("{}{path}", self.base)).call())
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Reply {
        Self::reply(
            self.agent
                .post(format!("{}{path}", self.base))
                .send_json(body),
        )
    }

    pub fn post_raw(&self, path: &str, content_type: &str, body: &[u8]) -> Reply {
        Self::reply(
            self.agent
                .post(format!("{}{path}", self.base))
                .header("content-type", content_type)
                .send(body),
        )
    }

    /// GET (no body) or POST (a JSON body) with `Authorization: <auth>` when given.
    pub fn with_auth(&self, path: &str, auth: Option<&str>, body: Option<&Value>) -> Reply {
        let url = format!("{}{path}", self.base);
        match body {
            None => {
                let mut req = self.agent.get(url);
                if let Some(a) = auth {
                    req = req.header("authorization", a);
                }
                Self::reply(req.call())
            }
            Some(json) => {
                let mut req = self.agent.post(url);
                if let Some(a) = auth {
                    req = req.header("authorization", a);
                }
                Self::reply(req.send_json(json))
            }
        }
    }

    /// POST raw bytes with extra headers.
    pub fn post_raw_with(
        &self,
        path: &str,
        content_type: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Self::reply(req.send(body))
    }

    /// The logits of one text for `task` (asserting a 200).
    pub fn logits(&self, task: &str, text: &str) -> Vec<f32> {
        let r = self.classify(&serde_json::json!({"task": task, "inputs": text}));
        assert_eq!(r.status, 200, "{}", r.text);
        serde_json::from_value(r.body["results"][0]["logits"].clone()).unwrap()
    }

    pub fn classify(&self, body: &Value) -> Reply {
        self.post_json("/v1/classify", body)
    }

    /// PUT with the admin token (or `auth` when given: `Some("")` sends none).
    pub fn put(&self, path: &str, content_type: &str, body: &[u8], auth: Option<&str>) -> Reply {
        let mut req = self
            .agent
            .put(format!("{}{path}", self.base))
            .header("content-type", content_type);
        match auth {
            None => req = req.header("authorization", format!("Bearer {TOKEN}")),
            Some("") => {}
            Some(a) => req = req.header("authorization", a),
        }
        Self::reply(req.send(body))
    }

    pub fn delete(&self, path: &str, auth: Option<&str>) -> Reply {
        let mut req = self.agent.delete(format!("{}{path}", self.base));
        match auth {
            None => req = req.header("authorization", format!("Bearer {TOKEN}")),
            Some("") => {}
            Some(a) => req = req.header("authorization", a),
        }
        Self::reply(req.call())
    }

    /// Sends SIGTERM; the server drains and exits.
    pub fn sigterm(&self) {
        let pid = self.child.as_ref().unwrap().id();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its status.
    pub fn wait(mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                panic!("server did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The value of one metric series in the Prometheus text, 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").text;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }

    /// Task names and versions, as served.
    pub fn tasks(&self) -> Vec<(String, String)> {
        let r = self.get("/v1/tasks");
        assert_eq!(r.status, 200);
        r.body["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["name"].as_str().unwrap().to_string(),
                    t["version"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Polls until `f` holds (directory watching is asynchronous).
    pub fn eventually(&self, what: &str, mut f: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while !f(self) {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every file in a directory with its bytes, for "disk unchanged" checks.
pub fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// A multipart/form-data body. Returns (content type, body).
pub fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "prefixd-test-boundary-7d0c";
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
            ),
            None => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
        }
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}
