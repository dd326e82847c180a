//! A real S3-compatible server for the prefix-store tests: moto's server mode (PyPI `moto`,
//! installed by scripts/clients-env), started on 127.0.0.1; and a TCP proxy in front of it that
//! a test can switch off, to make the store unreachable without losing its contents (moto keeps
//! them in memory, so stopping it would).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    pub fn start() -> Self {
        Self::start_env(&[])
    }

    /// moto that checks signatures: returns it with a bucket and the only key it accepts.
    pub fn start_with_auth(bucket: &str) -> (Self, (String, String)) {
        // Four unsigned requests for the set-up script, then authentication for everything.
        let moto = Self::start_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "4")]);
        let python = super::repo_root().join(".venv-clients/bin/python");
        let script = super::repo_root().join("tests/clients/moto_iam.py");
        let out = Command::new(python)
            .arg(script)
            .args([&moto.endpoint, bucket])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let key: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let pair = (
            key["id"].as_str().unwrap().to_string(),
            key["secret"].as_str().unwrap().to_string(),
        );
        (moto, pair)
    }

    fn start_env(env: &[(&str, &str)]) -> Self {
        let bin = std::env::var_os("PREFIXD_MOTO_SERVER")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| super::repo_root().join(".venv-clients/bin/moto_server"));
        assert!(
            bin.exists(),
            "{} is missing: run scripts/clients-env (scripts/test does)",
            bin.display()
        );
        // Port 0: moto binds whatever is free and says which. (Picking a free port first and
        // handing it over raced with the other tests doing the same: a moto that lost the bind
        // exited while the readiness check reached a neighbour's, which then went away.)
        let mut child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("moto_server starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            // Reads to the end, so moto never blocks on a full pipe.
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(port) = line
                    .split("Running on http://127.0.0.1:")
                    .nth(1)
                    .and_then(|rest| rest.trim().parse::<u16>().ok())
                {
                    let _ = tx.send(port);
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("moto did not say its port within 30 s");
        let moto = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "moto did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    /// moto does not check signatures, but treats a request without one as anonymous (and
    /// refuses it on objects a signed request wrote): this header makes it a signed one.
    const AUTH: &'static str = "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00";

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into()
    }

    pub fn create_bucket(&self, bucket: &str) {
        let r = Self::agent()
            .put(format!("{}/{bucket}", self.endpoint))
            .header("authorization", Self::AUTH)
            .send_empty()
            .unwrap();
        assert_eq!(r.status(), 200, "creating bucket {bucket}");
    }

    /// Writes an object as a third party would (moto does not check signatures).
    pub fn put_object(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let r = Self::agent()
            .put(format!("{}/{bucket}/{key}", self.endpoint))
            .header("authorization", Self::AUTH)
            .send(bytes)
            .unwrap();
        assert_eq!(r.status(), 200, "putting {key}");
    }

    pub fn get_object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let mut r = Self::agent()
            .get(format!("{}/{bucket}/{key}", self.endpoint))
            .header("authorization", Self::AUTH)
            .call()
            .unwrap();
        (r.status() == 200).then(|| r.body_mut().read_to_vec().unwrap())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Forwards 127.0.0.1:<port> to a target while up; while down, refuses new connections (accepts
/// and closes them) and cuts the ones open, as a store that went away would.
pub struct Proxy {
    pub endpoint: String,
    up: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(target: &str) -> Self {
        let target = target.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let up = Arc::new(AtomicBool::new(true));
        let flag = up.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !flag.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let flag = flag.clone();
                    std::thread::spawn(move || pump(from, to, &flag));
                }
            }
        });
        Self { endpoint, up }
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, up: &AtomicBool) {
    from.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = [0u8; 16 << 10];
    loop {
        if !up.load(Ordering::SeqCst) {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
