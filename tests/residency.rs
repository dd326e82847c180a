//! More tasks than memory: `--max-resident-bytes` keeps the weights of the most recently used
//! tasks in memory, the rest load from their files on demand. Real servers over the tiny model;
//! answers are compared with a server that keeps everything.

mod common;

use common::server::Server;
use common::tiny;
use serde_json::json;
use std::path::Path;

const TEXT: &str = "more tasks than memory";
const TASKS: usize = 30;
const RESIDENT: usize = 5;

fn names() -> Vec<String> {
    (0..TASKS).map(|i| format!("t{i:02}")).collect()
}

/// Bytes one tiny task holds in memory (P = 3, two labels): prefix K/V and head, f32.
fn task_cost() -> usize {
    let info = tiny::model_info();
    (3 * info.layers * 2 * info.hidden + 2 * info.hidden + 2) * 4
}

fn seed(dir: &Path) {
    for name in names() {
        tiny::seed_prefix(dir, &name, 3, 2);
    }
}

#[test]
fn a_resident_budget_bounds_memory_and_every_task_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    let all = Server::start_tiny(dir.path(), &[]);
    all.eventually("all resident", |s| {
        s.metric("prefixd_resident_tasks") == TASKS as f64
    });
    let budget = (RESIDENT * task_cost()).to_string();
    let few = Server::start_tiny(dir.path(), &["--max-resident-bytes", &budget]);

    // Every task is known at once; only as many as fit are loaded behind the server.
    assert_eq!(few.tasks().len(), TASKS);
    few.eventually("warm-up done", |s| {
        s.metric("prefixd_resident_tasks") >= 4.0
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let resident = few.metric("prefixd_resident_tasks");
    assert!((4.0..=RESIDENT as f64).contains(&resident), "{resident}");
    assert!(few.metric("prefixd_resident_bytes") <= (RESIDENT * task_cost()) as f64);
    let listed = few.get("/v1/tasks").body;
    let cold = listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["resident"] == false)
        .count();
    assert_eq!(cold, TASKS - resident as usize);
    // A cold task's listing still names its exact version.
    let versions = |s: &Server| s.tasks();
    assert_eq!(versions(&few), versions(&all));

    // Twice round every task: each answer equals the all-resident server's, memory stays
    // within the budget after every request, and the least recently used make room.
    for round in 0..2 {
        for name in names() {
            assert_eq!(
                few.logits(&name, TEXT),
                all.logits(&name, TEXT),
                "{name}, round {round}"
            );
            let bytes = few.metric("prefixd_resident_bytes");
            assert!(
                bytes <= (RESIDENT * task_cost()) as f64,
                "{bytes} bytes resident"
            );
        }
    }
    let misses = few.metric("prefixd_task_lookups_total{result=\"miss\"}");
    let hits = few.metric("prefixd_task_lookups_total{result=\"hit\"}");
    assert!(misses >= (2 * TASKS - RESIDENT) as f64, "{misses} misses");
    assert!(hits >= 1.0, "{hits} hits"); // the request right after a load… or a warm task
    assert_eq!(
        few.metric("prefixd_task_load_duration_seconds_count"),
        misses
    );
    assert!(few.metric("prefixd_tasks_evicted_total") >= (2 * TASKS - 2 * RESIDENT) as f64);

    // A hot task stays hot: asked for between every other, it is never evicted.
    let before = few.metric("prefixd_task_lookups_total{result=\"miss\"}");
    for name in names().iter().take(12) {
        few.logits("t29", TEXT);
        few.logits(name, TEXT);
    }
    let after = few.metric("prefixd_task_lookups_total{result=\"miss\"}");
    assert!(after - before <= 12.0, "t29 was evicted while in use");
}

/// A cold task whose file went bad answers with a JSON error that names the problem and is
/// unregistered; the others are unaffected. An upload past the budget evicts, not refuses.
#[test]
fn a_cold_task_with_a_bad_file_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    let budget = (RESIDENT * task_cost()).to_string();
    let server = Server::start_tiny(
        dir.path(),
        &[
            "--max-resident-bytes",
            &budget,
            "--no-watch",
            "--rescan-interval",
            "0",
        ],
    );
    server.eventually("warm-up done", |s| {
        s.metric("prefixd_resident_tasks") >= 4.0
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let cold = server.get("/v1/tasks").body["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["resident"] == false)
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    // Same header (so the registry still lists it), broken tensors.
    let path = dir.path().join(format!("{cold}.safetensors"));
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes.truncate(n - 8);
    std::fs::write(&path, &bytes).unwrap();
    let r = server.classify(&json!({"task": cold, "inputs": ["x"]}));
    assert!(r.status >= 500, "{} {}", r.status, r.text);
    assert!(
        r.body["error"].as_str().unwrap().contains(&cold),
        "{}",
        r.text
    );
    assert_eq!(server.get(&format!("/v1/tasks/{cold}")).status, 404);
    assert_eq!(
        server.metric("prefixd_prefix_loads_total{origin=\"demand\",result=\"error\"}"),
        1.0
    );
    assert_eq!(server.logits("t00", TEXT).len(), 2);

    let upload = tiny::prefix("fresh", 3, 2, 77).to_bytes().unwrap();
    let r = server.put(
        "/v1/admin/tasks/fresh",
        "application/octet-stream",
        &upload,
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["resident"], true);
    assert!(server.metric("prefixd_resident_bytes") <= (RESIDENT * task_cost()) as f64);
}
