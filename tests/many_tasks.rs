//! Many tasks in one replica: `/v1/tasks` in pages (and by name prefix), `/metrics` bounded
//! whatever the task count (per-task series for the first `--metrics-max-tasks` tasks, the rest
//! under `task="other"`, totals kept), and a directory of many files loaded at start (in
//! parallel) with every task served. Tiny model.

mod common;

use common::server::Server;
use common::tiny;
use serde_json::json;

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("t{i:02}")).collect()
}

fn start(n: usize, extra: &[&str]) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    for name in names(n) {
        tiny::seed_prefix(dir.path(), &name, 3, 2);
    }
    let server = Server::start_tiny(dir.path(), extra);
    (dir, server)
}

#[test]
fn the_task_list_comes_in_pages() {
    let (_dir, server) = start(25, &[]);
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &after {
            None => "/v1/tasks?limit=10".to_string(),
            Some(a) => format!("/v1/tasks?limit=10&after={a}"),
        };
        let r = server.get(&path);
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["total"], 25);
        let page: Vec<String> = r.body["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect();
        assert!(page.len() <= 10);
        seen.extend(page);
        pages += 1;
        match r.body["next_after"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!((pages, seen), (3, names(25)), "every task once, in order");

    let r = server.get("/v1/tasks?prefix=t1");
    let page: Vec<&str> = r.body["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(page, (10..20).map(|i| format!("t{i}")).collect::<Vec<_>>());
    assert_eq!(
        (r.body["total"].as_u64(), r.body["next_after"].is_null()),
        (Some(10), true)
    );
    assert_eq!(
        server.get("/v1/tasks").body["tasks"]
            .as_array()
            .unwrap()
            .len(),
        25,
        "one page by default"
    );

    for bad in ["limit=0", "limit=5000", "limit=x", "colour=blue"] {
        let r = server.get(&format!("/v1/tasks?{bad}"));
        assert_eq!(
            (r.status, r.body["error_type"].as_str()),
            (422, Some("invalid_input")),
            "{bad}: {}",
            r.text
        );
    }
}

#[test]
fn metrics_stay_bounded_and_keep_the_totals() {
    let (_dir, server) = start(12, &["--metrics-max-tasks", "3"]);
    for name in names(12) {
        let r = server.classify(&json!({"task": name, "inputs": ["a b"]}));
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let text = server.get("/metrics").text;
    let labelled: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("prefixd_requests_total{"))
        .filter_map(|l| l.split("task=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(labelled.len(), 4, "three tasks and other: {labelled:?}");
    assert!(labelled.contains("other"));
    let total: f64 = text
        .lines()
        .filter(|l| l.starts_with("prefixd_requests_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(total, 12.0, "every request counted");
    assert_eq!(
        server.metric("prefixd_requests_total{status=\"200\",task=\"other\"}"),
        9.0
    );
    let per_task = text.lines().filter(|l| l.contains("task=\"")).count();
    assert!(per_task <= 4 * 20, "{per_task} per-task lines");
}

#[test]
fn a_large_directory_loads_in_full() {
    let (_dir, server) = start(300, &[]);
    assert_eq!(server.get("/info").body["tasks"], 300);
    for name in ["t00", "t150", "t299"] {
        let r = server.classify(&json!({"task": name, "inputs": ["c d"]}));
        assert_eq!(r.status, 200, "{name}: {}", r.text);
    }
}

/// A bad file is reported once, not at every rescan; changing it gets it looked at again.
#[test]
fn a_bad_file_is_reported_once_until_it_changes() {
    let (dir, server) = start(2, &["--rescan-interval", "0.2"]);
    let errors = |s: &Server| {
        s.metric("prefixd_prefix_loads_total{origin=\"watch\",result=\"error\"}")
            + s.metric("prefixd_prefix_loads_total{origin=\"rescan\",result=\"error\"}")
    };
    let bad = dir.path().join("bad.safetensors");
    // Each version appears whole (written aside, then renamed): a plain write is a create and a
    // write, and a scan between the two sees an empty file — a version of its own.
    let put = |bytes: &[u8]| {
        let aside = dir.path().join("bad.partial");
        std::fs::write(&aside, bytes).unwrap();
        std::fs::rename(&aside, &bad).unwrap();
    };
    put(b"not a prefix file");
    server.eventually("the bad file counted", |s| errors(s) >= 1.0);
    std::thread::sleep(std::time::Duration::from_millis(1500)); // seven rescans
    assert_eq!(errors(&server), 1.0);
    put(b"still not a prefix file, but another one");
    server.eventually("the changed file counted", |s| errors(s) >= 2.0);
    std::thread::sleep(std::time::Duration::from_millis(1000));
    assert_eq!(errors(&server), 2.0);
    assert_eq!(server.tasks().len(), 2);
}
