//! What an attacker or an operator can do to a running server, and what must hold: bounded
//! connections, bodies, files and time; a drain Kubernetes can use; every error JSON. Each test
//! is the regression test of a finding (numbered as in the hardening issue). All run on the tiny
//! test model, over real HTTP on 127.0.0.1 or raw TCP where the finding lives below HTTP.

mod common;

use common::server::{multipart, snapshot, Server, TOKEN};
use common::tiny;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

const OCTET: &str = "application/octet-stream";

/// A prefixes folder with two tiny-model tasks: `alpha` (P = 4, 2 labels), `beta` (P = 6, 3).
fn folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tiny::seed_prefix(dir.path(), "alpha", 4, 2);
    tiny::seed_prefix(dir.path(), "beta", 6, 3);
    dir
}

fn start(extra: &[&str]) -> (tempfile::TempDir, Server) {
    let dir = folder();
    let server = Server::start_tiny(dir.path(), extra);
    (dir, server)
}

/// Reads from a raw socket until the peer closes it (Ok) or `limit` passes (Err).
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Result<Vec<u8>, Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (start, mut got) = (Instant::now(), Vec::new());
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Ok(got), // reset: closed too
        }
    }
    Err(got)
}

/// The status line and JSON body of a raw HTTP/1.1 response.
fn parse_response(raw: &[u8]) -> (u16, Value, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (
        status,
        serde_json::from_str(body.trim()).unwrap_or(Value::Null),
        text,
    )
}

#[test]
fn the_tiny_model_serves() {
    let (_dir, server) = start(&[]);
    let r = server.classify(&json!({"task": "beta", "inputs": ["a witty film", {"text": "hello", "text_pair": "world"}]}));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["results"].as_array().unwrap().len(), 2);
    assert_eq!(r.body["results"][0]["scores"].as_array().unwrap().len(), 3);
}

/// 1. Connections that send nothing, or headers slowly, are closed; kept-alive connections that
///    go idle too; and past the cap new clients wait rather than exhaust file descriptors.
#[test]
fn f01_idle_and_slow_connections_close_and_the_cap_holds() {
    let (_dir, server) = start(&["--header-timeout", "1", "--max-connections", "2"]);
    let addr = server.addr();
    // Silent connection.
    let mut silent = TcpStream::connect(&addr).unwrap();
    assert!(
        read_until_closed(&mut silent, Duration::from_secs(5)).is_ok(),
        "silent connection left open"
    );
    // Headers that never finish.
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    assert!(
        read_until_closed(&mut slow, Duration::from_secs(5)).is_ok(),
        "slow headers left open"
    );
    // One request, then idle on keep-alive: answered, then closed.
    let mut kept = TcpStream::connect(&addr).unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = read_until_closed(&mut kept, Duration::from_secs(5)).expect("idle keep-alive closed");
    assert_eq!(parse_response(&got).0, 200);
    drop((silent, slow, kept));

    // The cap (2), with a long header timeout so nothing is reaped meanwhile.
    drop(server);
    let (_dir, server) = start(&["--header-timeout", "60", "--max-connections", "2"]);
    let addr = server.addr();
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300)); // both accepted
    let mut third = TcpStream::connect(&addr).unwrap(); // completes in the kernel's backlog
    third
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert!(
        read_until_closed(&mut third, Duration::from_secs(1)).is_err(),
        "a third connection was served past a cap of 2"
    );
    drop(held);
    let got =
        read_until_closed(&mut third, Duration::from_secs(5)).expect("served once a slot freed");
    assert_eq!(parse_response(&got).0, 200);
}

fn raw_put(
    addr: &str,
    path: &str,
    auth: Option<&str>,
    declared: usize,
    send: &[u8],
) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr)?;
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {OCTET}\r\nContent-Length: {declared}\r\n{auth}\r\n"
    )?;
    let _ = s.write_all(send); // an early answer may close the socket under us
    read_until_closed(&mut s, Duration::from_secs(10))
        .map_err(|_| std::io::Error::other("left open"))
}

/// 2. Admin bodies are not read before the token is checked (nor with admin disabled); uploads
///    at once are bounded; a wrong token still reaches a client that sends a small body.
#[test]
fn f02_uploads_are_authorized_before_their_bodies_are_read() {
    let (_dir, server) = start(&[
        "--max-upload-bytes",
        "70000000",
        "--max-concurrent-uploads",
        "1",
    ]);
    let addr = server.addr();
    let before = server.rss();
    let chunk = vec![7u8; 4 << 20];
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let (addr, chunk) = (addr.clone(), chunk.clone());
            std::thread::spawn(move || {
                let auth = (i % 2 == 0).then_some("Bearer wrong");
                let mut s = TcpStream::connect(&addr).unwrap();
                let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
                write!(s, "PUT /v1/admin/tasks/x{i} HTTP/1.1\r\nHost: x\r\nContent-Type: {OCTET}\r\nContent-Length: 62914560\r\n{auth}\r\n").unwrap();
                for _ in 0..15 {
                    if s.write_all(&chunk).is_err() {
                        break; // refused and closed: as it should be
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let grown = server.rss().saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "16 unauthorized 60 MB uploads grew RSS by {} MB",
        grown >> 20
    );

    // A small body with a wrong token: the JSON 401/403 arrives.
    let r = server.put("/v1/admin/tasks/alpha", OCTET, b"tiny", Some("Bearer nope"));
    assert_eq!(
        (r.status, r.body["error_type"].as_str()),
        (403, Some("forbidden")),
        "{}",
        r.text
    );

    // One upload slot: a second upload while the first is still sending gets 429 at once.
    let mut first = TcpStream::connect(&addr).unwrap();
    write!(first, "PUT /v1/admin/tasks/slow HTTP/1.1\r\nHost: x\r\nContent-Type: {OCTET}\r\nContent-Length: 1000\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").unwrap();
    first.write_all(&[0u8; 10]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let got = raw_put(
        &addr,
        "/v1/admin/tasks/second",
        Some(&format!("Bearer {TOKEN}")),
        4,
        b"abcd",
    )
    .unwrap();
    let (status, body, text) = parse_response(&got);
    assert_eq!(
        (status, body["error_type"].as_str()),
        (429, Some("too_many_uploads")),
        "{text}"
    );
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 1"),
        "{text}"
    );
    drop(first);

    // Admin disabled: refused before the body too.
    drop(server);
    let dir = folder();
    let server = Server::start_with(&tiny::model_dir(), dir.path(), &[], |c| {
        c.env_remove("PREFIXD_ADMIN_TOKEN");
    });
    let got = raw_put(&server.addr(), "/v1/admin/tasks/x", None, 62914560, &chunk).unwrap();
    assert_eq!(parse_response(&got).1["error_type"], "admin_disabled");
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: creates a FIFO at a path in the test's own temp dir.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

/// 3 and 7. A FIFO, or a huge sparse file, named like a prefix neither blocks startup nor the
/// registry, nor costs memory: skipped, counted, logged.
#[test]
fn f03_f07_fifos_and_huge_files_in_the_folder_are_skipped_unread() {
    let dir = folder();
    mkfifo(&dir.path().join("pipe.safetensors"));
    std::fs::File::create(dir.path().join("huge.safetensors"))
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let server = Server::start_tiny(dir.path(), &["--max-upload-bytes", "1000000"]);
    let names: Vec<String> = server.tasks().into_iter().map(|t| t.0).collect();
    assert_eq!(names, ["alpha", "beta"]);
    assert!(
        server.rss() < 512 << 20,
        "RSS {} MB after a 2 GB file in the folder",
        server.rss() >> 20
    );
    assert_eq!(
        server.metric("prefixd_prefix_loads_total{origin=\"startup\",result=\"error\"}"),
        2.0
    );

    // A FIFO appearing while running does not stall uploads or deletes.
    mkfifo(&dir.path().join("pipe2.safetensors"));
    std::thread::sleep(Duration::from_millis(600)); // the watcher has looked at it
    let gamma = tiny::prefix("gamma", 3, 2, 9).to_bytes().unwrap();
    let t0 = Instant::now();
    assert_eq!(
        server
            .put("/v1/admin/tasks/gamma", OCTET, &gamma, None)
            .status,
        200
    );
    assert_eq!(server.delete("/v1/admin/tasks/gamma", None).status, 204);
    assert!(t0.elapsed() < Duration::from_secs(10));
    server.eventually("the new FIFO is counted as a failed load", |s| {
        s.metric("prefixd_prefix_loads_total{origin=\"watch\",result=\"error\"}") >= 1.0
    });
}

/// 4. A slow but steady upload succeeds; a body that stops is a 408, never a parse of half a body
///    (nor a 200 for a classify body shorter than its Content-Length).
#[test]
fn f04_slow_bodies_complete_and_stalled_bodies_get_408() {
    let (_dir, server) = start(&["--body-idle-timeout", "1"]);
    let addr = server.addr();
    let file = tiny::prefix("slowpoke", 8, 2, 3).to_bytes().unwrap();
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(s, "PUT /v1/admin/tasks/slowpoke HTTP/1.1\r\nHost: x\r\nContent-Type: {OCTET}\r\nContent-Length: {}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n", file.len()).unwrap();
    for piece in file.chunks(file.len().div_ceil(6)) {
        s.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(400)); // ~6 pieces over 2.4 s, no gap over 1 s
    }
    let got = read_until_closed(&mut s, Duration::from_secs(10)).unwrap();
    let (status, body, text) = parse_response(&got);
    assert_eq!(status, 200, "{text}");
    assert_eq!(body["name"], "slowpoke");

    for (method, path, extra) in [
        (
            "POST",
            "/v1/classify",
            "Content-Type: application/json\r\n".to_string(),
        ),
        (
            "PUT",
            "/v1/admin/tasks/stalled",
            format!("Content-Type: {OCTET}\r\nAuthorization: Bearer {TOKEN}\r\n"),
        ),
    ] {
        // 100 bytes announced, 12 sent, then silence.
        let mut s = TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n{extra}\r\n"
        )
        .unwrap();
        s.write_all(br#"{"task": "al"#).unwrap();
        let got = read_until_closed(&mut s, Duration::from_secs(10)).unwrap();
        let (status, body, text) = parse_response(&got);
        assert_eq!(
            (status, body["error_type"].as_str()),
            (408, Some("request_timeout")),
            "{path}: {text}"
        );
    }
    assert!(!server.tasks().iter().any(|t| t.0 == "stalled"));
}

/// 6. SIGTERM: readiness fails first while requests are still served for the drain delay; then
///    the listener closes and the process exits 0.
#[test]
fn f06_readiness_fails_first_then_the_listener_closes() {
    let (_dir, server) = start(&["--drain-delay", "2", "--shutdown-timeout", "5"]);
    assert_eq!(server.get("/ready").status, 200);
    server.sigterm();
    server.eventually("readiness 503", |s| s.get("/ready").status == 503);
    let r = server.get("/ready");
    assert_eq!(r.body["status"], "draining");
    assert!(r.text.contains("draining"));
    // Still serving during the delay.
    let r = server.classify(&json!({"task": "alpha", "inputs": "still here"}));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(server.get("/health").status, 200);
    let addr = server.addr();
    let status = server.wait(Duration::from_secs(15));
    assert!(status.success(), "{status:?}");
    assert!(
        TcpStream::connect(&addr).is_err(),
        "listener still open after exit"
    );
}

/// 8. Hand edits to one task take effect while uploads to another arrive every 150 ms.
#[test]
fn f08_hand_edits_are_not_starved_by_other_traffic() {
    let (dir, server) = start(&["--rescan-interval", "0"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hammer = {
        let (stop, agent, base) = (stop.clone(), server.agent(), server.base.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let bytes = tiny::prefix("beta", 6, 3, 100 + i).to_bytes().unwrap();
                let r = agent
                    .put(format!("{base}/v1/admin/tasks/beta"))
                    .header("authorization", format!("Bearer {TOKEN}"))
                    .header("content-type", OCTET)
                    .send(&bytes[..])
                    .unwrap();
                assert_eq!(r.status(), 200);
                i += 1;
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };
    let mut last = String::new();
    for k in 0..15 {
        let bytes = tiny::prefix("alpha", 4, 2, 1000 + k).to_bytes().unwrap();
        let tmp = dir.path().join("alpha.part");
        std::fs::write(&tmp, &bytes).unwrap();
        std::fs::rename(&tmp, dir.path().join("alpha.safetensors")).unwrap();
        last = prefixd::engine::Task::version_of(&bytes);
        std::thread::sleep(Duration::from_millis(100));
    }
    server.eventually("the last hand edit is served", |s| {
        s.tasks().iter().any(|(n, v)| n == "alpha" && *v == last)
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    hammer.join().unwrap();
}

/// 9 and 10. A prefix file with max_length 0 is refused; temp files left by a crash are removed.
#[test]
fn f09_f10_max_length_zero_is_refused_and_stale_temp_files_go() {
    let dir = folder();
    let stale = dir.path().join(".alpha.safetensors.4194999.tmp");
    std::fs::write(&stale, b"half an upload").unwrap();
    let server = Server::start_tiny(dir.path(), &[]);
    assert!(
        !stale.exists(),
        "a temp file of a dead writer survived the start"
    );
    let mut zero = tiny::prefix("zero", 4, 2, 5);
    zero.meta.max_length = Some(0);
    let r = server.put(
        "/v1/admin/tasks/zero",
        OCTET,
        &zero.to_bytes().unwrap(),
        None,
    );
    assert_eq!(
        (r.status, r.body["error_type"].as_str()),
        (422, Some("invalid_prefix")),
        "{}",
        r.text
    );
    assert!(r.body["error"].as_str().unwrap().contains("max_length"));
}

/// 11. Every error is `{"error", "error_type"}`: 405, an unreadable path, an unknown route.
#[test]
fn f11_every_error_is_json() {
    let (_dir, server) = start(&[]);
    let r = server.get("/v1/classify");
    assert_eq!(
        (r.status, r.body["error_type"].as_str()),
        (405, Some("method_not_allowed")),
        "{}",
        r.text
    );
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.write_all(b"GET /v1/tasks/%FF%FE HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (status, body, text) =
        parse_response(&read_until_closed(&mut s, Duration::from_secs(5)).unwrap());
    assert_eq!(status, 400, "{text}");
    assert!(
        body["error"].is_string() && body["error_type"] == "invalid_task_name",
        "{text}"
    );
    let r = server.get("/nope");
    assert_eq!(
        (r.status, r.body["error_type"].as_str()),
        (404, Some("not_found"))
    );
    // Refusals hyper makes before any handler runs: a malformed request, a head too large.
    for (raw, status, error_type) in [
        (b"BLAH\r\n\r\n".to_vec(), 400, "invalid_request"),
        (
            [
                b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec(),
                vec![b'a'; 600_000],
                b"\r\n\r\n".to_vec(),
            ]
            .concat(),
            431,
            "headers_too_large",
        ),
    ] {
        let mut s = TcpStream::connect(server.addr()).unwrap();
        let _ = s.write_all(&raw);
        let (got, body, text) =
            parse_response(&read_until_closed(&mut s, Duration::from_secs(5)).unwrap());
        assert_eq!(
            (got, body["error_type"].as_str()),
            (status, Some(error_type)),
            "{text}"
        );
    }
}

/// 12. Pair items are as strict as the request body.
#[test]
fn f12_pair_items_refuse_unknown_fields() {
    let (_dir, server) = start(&[]);
    let r = server.classify(
        &json!({"task": "alpha", "inputs": [{"text": "a", "text_pair": "b", "evil": 1}]}),
    );
    assert_eq!(
        (r.status, r.body["error_type"].as_str()),
        (422, Some("invalid_input")),
        "{}",
        r.text
    );
    assert!(
        r.body["error"].as_str().unwrap().contains("evil"),
        "{}",
        r.text
    );
}

/// 15. A full disk is 507 `insufficient_storage`, names no server path, and changes nothing.
///     (The file-size limit makes the write fail as a full disk would.)
#[test]
fn f15_a_full_disk_is_507_without_paths() {
    let dir = folder();
    let server = Server::start_with(&tiny::model_dir(), dir.path(), &[], |c| {
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec, only async-signal-safe calls (signal, setrlimit).
        unsafe {
            c.pre_exec(|| {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let lim = libc::rlimit {
                    rlim_cur: 1024,
                    rlim_max: 1024,
                };
                libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
                Ok(())
            });
        }
    });
    let before = snapshot(dir.path());
    let big = tiny::prefix("gamma", 16, 2, 1).to_bytes().unwrap();
    assert!(big.len() > 1024);
    let r = server.put("/v1/admin/tasks/gamma", OCTET, &big, None);
    assert_eq!(
        (r.status, r.body["error_type"].as_str()),
        (507, Some("insufficient_storage")),
        "{}",
        r.text
    );
    let dir_name = dir.path().to_str().unwrap();
    assert!(
        !r.text.contains(dir_name) && !r.text.contains("/tmp"),
        "{}",
        r.text
    );
    assert_eq!(snapshot(dir.path()), before);
    assert!(!server.tasks().iter().any(|t| t.0 == "gamma"));
}

/// Logs that cannot be written (stderr on a full disk) lose log lines, never requests: the
/// logger's own error report must not panic the task that is serving.
#[test]
fn an_unwritable_log_loses_lines_not_requests() {
    let dir = folder();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let server = Server::start_with(&tiny::model_dir(), dir.path(), &[], |c| {
        c.env("RUST_LOG", "debug").stderr(full);
    });
    for _ in 0..3 {
        // Each of these logs at least one line (a rejected upload is a warning).
        let r = server.put("/v1/admin/tasks/gamma", OCTET, b"not safetensors", None);
        assert_eq!(r.status, 422, "{}", r.text);
        let r = server.classify(&json!({"task": "alpha", "inputs": ["still here"]}));
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(server.get("/ready").status, 200);
}

/// 16. The Bearer scheme is case-insensitive (RFC 9110).
#[test]
fn f16_bearer_is_case_insensitive() {
    let (_dir, server) = start(&[]);
    let bytes = tiny::prefix("gamma", 3, 2, 2).to_bytes().unwrap();
    for auth in [
        format!("bearer {TOKEN}"),
        format!("BEARER {TOKEN}"),
        format!("Bearer   {TOKEN} "),
    ] {
        let r = server.put("/v1/admin/tasks/gamma", OCTET, &bytes, Some(&auth));
        assert_eq!(r.status, 200, "{auth:?}: {}", r.text);
    }
    let r = server.put(
        "/v1/admin/tasks/gamma",
        OCTET,
        &bytes,
        Some(&format!("Basic {TOKEN}")),
    );
    assert_eq!(r.status, 401);
}

/// A tokenizer that is not the model's own produces ids past its vocabulary: each request gets a
/// 422 naming the problem, and the model thread is untouched (the server stays ready).
#[test]
fn token_ids_past_the_vocabulary_are_refused_not_a_crash() {
    let model = tempfile::tempdir().unwrap();
    tiny::write_model(model.path(), Some(20), 7); // the tokenizer knows ~120 tokens
    let prefixes = tempfile::tempdir().unwrap();
    let server = Server::start_with(model.path(), prefixes.path(), &[], |_| {});
    let info = prefixd::model::PrefixedBert::load(model.path(), &candle_core::Device::Cpu)
        .unwrap()
        .info()
        .clone();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    let file = prefixd::prefix::synthetic::random_prefix(&info, "t", 4, 2, &mut rng).unwrap();
    assert_eq!(
        server
            .put("/v1/admin/tasks/t", OCTET, &file.to_bytes().unwrap(), None)
            .status,
        200
    );
    for _ in 0..4 {
        let r = server.classify(&json!({"task": "t", "inputs": "what a witty film"}));
        assert_eq!(
            (r.status, r.body["error_type"].as_str()),
            (422, Some("invalid_input")),
            "{}",
            r.text
        );
        assert!(
            r.body["error"].as_str().unwrap().contains("vocabulary"),
            "{}",
            r.text
        );
    }
    assert_eq!(server.get("/ready").status, 200);
    // Only [CLS] and [SEP] (ids 2 and 3): inside the vocabulary, so served.
    assert_eq!(
        server.classify(&json!({"task": "t", "inputs": ""})).status,
        200
    );
}

/// Uploads work as multipart PEFT folders on the tiny model too (exercised by the fuzz tests).
#[test]
fn multipart_peft_upload_on_the_tiny_model() {
    let (_dir, server) = start(&[]);
    let file = tiny::prefix("peft", 5, 2, 11);
    let out = tempfile::tempdir().unwrap();
    let _ = prefixd::prefix::peft::export_dir(&file, out.path()).unwrap();
    let config = std::fs::read(out.path().join("adapter_config.json")).unwrap();
    let weights = std::fs::read(out.path().join("adapter_model.safetensors")).unwrap();
    let (ct, body) = multipart(&[
        ("adapter_config.json", Some("adapter_config.json"), &config),
        (
            "adapter_model.safetensors",
            Some("adapter_model.safetensors"),
            &weights,
        ),
        ("labels", None, br#"["no","yes"]"#),
    ]);
    let r = server.put("/v1/admin/tasks/peft", &ct, &body, None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["labels"], json!(["no", "yes"]));
}
