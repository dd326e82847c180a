//! Admin routes and the prefixes directory over real HTTP: uploads take effect at once and survive
//! a restart; bad uploads change nothing, in memory or on disk; hand edits are picked up.

mod common;

use common::server::{multipart, seed_prefixes, snapshot, Server, TOKEN};
use common::{cases, engine, fixtures_dir, max_abs_diff};
use prefixd::prefix::peft;
use prefixd::prefix::{HostTensor, PrefixFile};
use serde_json::json;

const OCTET: &str = "application/octet-stream";

fn native(case: &str) -> PrefixFile {
    peft::import_dir(
        &fixtures_dir().join(case),
        &Default::default(),
        engine().model_info(),
    )
    .unwrap()
}

fn fixture_text_and_logits(case: &str) -> (String, Vec<f32>) {
    let c = cases(case)
        .into_iter()
        .find(|c| c.text_pair.is_none())
        .unwrap();
    (c.text, c.logits)
}

#[test]
fn upload_replace_delete_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    assert!(server.tasks().is_empty());

    // Native upload: classifiable at once, with the fixture's numbers.
    let bytes = native("sst2-like-p8").to_bytes().unwrap();
    let r = server.put("/v1/admin/tasks/sentiment", OCTET, &bytes, None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["name"], "sentiment");
    assert_eq!(r.body["num_virtual_tokens"], 8);
    let (text, want) = fixture_text_and_logits("sst2-like-p8");
    assert!(max_abs_diff(&server.logits("sentiment", &text), &want) <= 1e-4);
    assert!(
        dir.path().join("sentiment.safetensors").is_file(),
        "persisted"
    );

    // PEFT multipart upload with label names and a problem type.
    let adapter = fixtures_dir().join("multi4-p20");
    let config = std::fs::read(adapter.join("adapter_config.json")).unwrap();
    let weights = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let labels = br#"["world","sports","business","sci_tech"]"#;
    let (ct, body) = multipart(&[
        ("adapter_config.json", Some("adapter_config.json"), &config),
        (
            "adapter_model.safetensors",
            Some("adapter_model.safetensors"),
            &weights,
        ),
        ("labels", None, labels),
        ("problem_type", None, b"single_label"),
    ]);
    let r = server.put("/v1/admin/tasks/news", &ct, &body, None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body["labels"],
        json!(["world", "sports", "business", "sci_tech"])
    );
    let (text4, want4) = fixture_text_and_logits("multi4-p20");
    let r = server.classify(&json!({"task": "news", "inputs": text4}));
    let got: Vec<f32> = serde_json::from_value(r.body["results"][0]["logits"].clone()).unwrap();
    assert!(max_abs_diff(&got, &want4) <= 1e-4);
    assert_eq!(
        r.body["results"][0]["label"],
        cases("multi4-p20")[0].label_name()
    );

    // Replace "sentiment" with another prefix: new version, new results.
    let old_version = server.get("/v1/tasks/sentiment").body["version"].clone();
    let mut other = native("sst2-like-p8");
    for x in other.classifier_bias.data.iter_mut() {
        *x += 1.0;
    }
    other.classifier_bias.data[0] += 2.0;
    let r = server.put(
        "/v1/admin/tasks/sentiment",
        OCTET,
        &other.to_bytes().unwrap(),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_ne!(r.body["version"], old_version);
    let replaced = server.logits("sentiment", &text);
    assert!(
        (replaced[0] - want[0] - 3.0).abs() < 1e-4,
        "replacement serves: {replaced:?}"
    );

    // Restart: uploads are still there, same versions.
    let before = server.tasks();
    drop(server);
    let server = Server::start(dir.path(), &[]);
    assert_eq!(server.tasks(), before);
    assert!((server.logits("sentiment", &text)[0] - replaced[0]).abs() < 1e-6);

    // Delete: gone from the registry and the directory.
    let r = server.delete("/v1/admin/tasks/sentiment", None);
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(
        server
            .classify(&json!({"task": "sentiment", "inputs": "x"}))
            .status,
        404
    );
    assert_eq!(server.get("/v1/tasks/sentiment").status, 404);
    assert!(!dir.path().join("sentiment.safetensors").exists());
    let r = server.delete("/v1/admin/tasks/sentiment", None);
    assert_eq!(
        (r.status, r.body["error_type"].as_str()),
        (404, Some("unknown_task"))
    );
}

#[test]
fn hand_edits_to_the_directory_are_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let loads_ok = "prefixd_prefix_loads_total{origin=\"watch\",result=\"ok\"}";
    let loads_err = "prefixd_prefix_loads_total{origin=\"watch\",result=\"error\"}";

    // Dropped in by hand.
    native("proj-p10")
        .write(&dir.path().join("dropped.safetensors"))
        .unwrap();
    server.eventually("dropped file loaded", |s| {
        s.get("/v1/tasks/dropped").status == 200
    });
    let (text, want) = fixture_text_and_logits("proj-p10");
    assert!(max_abs_diff(&server.logits("dropped", &text), &want) <= 1e-4);
    assert!(server.metric(loads_ok) >= 1.0);

    // Replaced by hand with a bad file: rejected, the old version keeps serving.
    let version = server.get("/v1/tasks/dropped").body["version"].clone();
    std::fs::write(dir.path().join("dropped.safetensors"), b"garbage").unwrap();
    server.eventually("bad file counted", |s| s.metric(loads_err) >= 1.0);
    assert_eq!(server.get("/v1/tasks/dropped").body["version"], version);
    assert!(max_abs_diff(&server.logits("dropped", &text), &want) <= 1e-4);

    // Other files are ignored; removal unloads.
    std::fs::write(dir.path().join("notes.txt"), b"not a prefix").unwrap();
    std::fs::remove_file(dir.path().join("dropped.safetensors")).unwrap();
    server.eventually("removed file unloaded", |s| {
        s.get("/v1/tasks/dropped").status == 404
    });
    assert!(server.tasks().is_empty());
}

#[test]
fn a_bad_file_at_startup_is_skipped_and_the_rest_load() {
    let dir = tempfile::tempdir().unwrap();
    seed_prefixes(dir.path());
    std::fs::write(dir.path().join("broken.safetensors"), b"\x00\x01").unwrap();
    let server = Server::start(dir.path(), &[]);
    assert_eq!(server.tasks().len(), 3);
    assert_eq!(
        server.metric("prefixd_prefix_loads_total{origin=\"startup\",result=\"error\"}"),
        1.0
    );
    // The weights load behind the ready server.
    server.eventually("all resident", |s| {
        s.metric("prefixd_resident_tasks") == 3.0
    });
    assert_eq!(
        server.metric("prefixd_prefix_loads_total{origin=\"startup\",result=\"ok\"}"),
        3.0
    );
}

#[test]
fn bad_uploads_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    seed_prefixes(dir.path());
    let server = Server::start(dir.path(), &["--max-upload-bytes", "500000"]);
    let good = native("sst2-like-p8");
    let good_bytes = good.to_bytes().unwrap();

    let mut nan = good.clone();
    nan.prompt_embeddings.data[7] = f32::NAN;
    let mut wrong_dims = good.clone();
    let p = wrong_dims.meta.num_virtual_tokens;
    wrong_dims.meta.base_model.hidden = 768;
    wrong_dims.prompt_embeddings = HostTensor {
        shape: vec![p, 6 * 2 * 768],
        data: vec![0.0; p * 6 * 2 * 768],
    };
    wrong_dims.classifier_weight = HostTensor {
        shape: vec![2, 768],
        data: vec![0.0; 2 * 768],
    };
    let mut fingerprint = good.clone();
    fingerprint.meta.base_model.fingerprint = Some(format!("sha256:{}", "1".repeat(64)));
    let adapter = fixtures_dir().join("multi4-p20");
    let config = std::fs::read(adapter.join("adapter_config.json")).unwrap();
    let weights = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let (ct_wrong_labels, wrong_labels) = multipart(&[
        ("adapter_config.json", Some("adapter_config.json"), &config),
        (
            "adapter_model.safetensors",
            Some("adapter_model.safetensors"),
            &weights,
        ),
        ("labels", None, br#"["a","b"]"#),
    ]);
    let (ct_missing, missing_weights) =
        multipart(&[("adapter_config.json", Some("adapter_config.json"), &config)]);
    let bearer = format!("Bearer {TOKEN}");
    let long_name_path = format!("/v1/admin/tasks/{}", "a".repeat(129));
    let wrong = "Bearer not-the-token".to_string();

    struct Bad<'a> {
        what: &'a str,
        path: &'a str,
        content_type: &'a str,
        body: Vec<u8>,
        auth: Option<&'a str>,
        status: u16,
        error_type: &'a str,
        mention: &'a str,
    }
    let bad = |what, path, content_type, body, auth, status, error_type, mention| Bad {
        what,
        path,
        content_type,
        body,
        auth,
        status,
        error_type,
        mention,
    };
    let uploads = vec![
        bad(
            "garbage",
            "/v1/admin/tasks/sst2-like-p8",
            OCTET,
            b"garbage bytes".to_vec(),
            None,
            422,
            "invalid_prefix",
            "not a valid safetensors",
        ),
        bad(
            "truncated",
            "/v1/admin/tasks/sst2-like-p8",
            OCTET,
            good_bytes[..good_bytes.len() - 100].to_vec(),
            None,
            422,
            "invalid_prefix",
            "safetensors",
        ),
        bad(
            "wrong dims",
            "/v1/admin/tasks/sst2-like-p8",
            OCTET,
            wrong_dims.to_bytes().unwrap(),
            None,
            422,
            "invalid_prefix",
            "hidden size = 768",
        ),
        bad(
            "NaN",
            "/v1/admin/tasks/sst2-like-p8",
            OCTET,
            nan.to_bytes().unwrap(),
            None,
            422,
            "invalid_prefix",
            "non-finite",
        ),
        bad(
            "fingerprint",
            "/v1/admin/tasks/sst2-like-p8",
            OCTET,
            fingerprint.to_bytes().unwrap(),
            None,
            422,
            "invalid_prefix",
            "base model weights",
        ),
        bad(
            "label count",
            "/v1/admin/tasks/new",
            &ct_wrong_labels,
            wrong_labels.clone(),
            None,
            422,
            "invalid_prefix",
            "2 label names",
        ),
        bad(
            "missing file",
            "/v1/admin/tasks/new",
            &ct_missing,
            missing_weights.clone(),
            None,
            400,
            "invalid_request",
            "adapter_model.safetensors",
        ),
        bad(
            "name with dots",
            "/v1/admin/tasks/..%2F..%2Fetc%2Fpasswd",
            OCTET,
            good_bytes.clone(),
            None,
            400,
            "invalid_task_name",
            "invalid task name",
        ),
        bad(
            "name starting with dash",
            "/v1/admin/tasks/-x",
            OCTET,
            good_bytes.clone(),
            None,
            400,
            "invalid_task_name",
            "invalid task name",
        ),
        bad(
            "hidden name",
            "/v1/admin/tasks/.hidden",
            OCTET,
            good_bytes.clone(),
            None,
            400,
            "invalid_task_name",
            "invalid task name",
        ),
        bad(
            "long name",
            &long_name_path,
            OCTET,
            good_bytes.clone(),
            None,
            400,
            "invalid_task_name",
            "invalid task name",
        ),
        bad(
            "oversize",
            "/v1/admin/tasks/big",
            OCTET,
            vec![0u8; 600_000],
            None,
            413,
            "payload_too_large",
            "",
        ),
        bad(
            "missing token",
            "/v1/admin/tasks/new",
            OCTET,
            good_bytes.clone(),
            Some(""),
            401,
            "unauthorized",
            "Bearer",
        ),
        bad(
            "wrong token",
            "/v1/admin/tasks/new",
            OCTET,
            good_bytes.clone(),
            Some(&wrong),
            403,
            "forbidden",
            "token",
        ),
        bad(
            "content type",
            "/v1/admin/tasks/new",
            "text/plain",
            good_bytes.clone(),
            Some(&bearer),
            415,
            "unsupported_media_type",
            "octet-stream",
        ),
    ];
    let tasks_before = server.tasks();
    let disk_before = snapshot(dir.path());
    let errors_before =
        server.metric("prefixd_prefix_loads_total{origin=\"upload\",result=\"error\"}");
    for b in &uploads {
        let r = server.put(b.path, b.content_type, &b.body, b.auth);
        assert_eq!(r.status, b.status, "{}: {}", b.what, r.text);
        assert_eq!(r.body["error_type"], b.error_type, "{}: {}", b.what, r.text);
        let msg = r.body["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(b.mention),
            "{}: {msg:?} should mention {:?}",
            b.what,
            b.mention
        );
        assert_eq!(server.tasks(), tasks_before, "{}: registry changed", b.what);
        assert!(
            snapshot(dir.path()) == disk_before,
            "{}: directory changed",
            b.what
        );
    }
    // Invalid prefixes (not auth or name failures) count as failed loads.
    let counted = server.metric("prefixd_prefix_loads_total{origin=\"upload\",result=\"error\"}")
        - errors_before;
    assert_eq!(counted, 6.0);
    // Deleting needs the token too, and changes nothing without it.
    for (auth, status) in [(Some(""), 401), (Some(wrong.as_str()), 403)] {
        assert_eq!(
            server.delete("/v1/admin/tasks/sst2-like-p8", auth).status,
            status
        );
    }
    assert!(snapshot(dir.path()) == disk_before);
    let (text, want) = fixture_text_and_logits("sst2-like-p8");
    assert!(max_abs_diff(&server.logits("sst2-like-p8", &text), &want) <= 1e-4);
}

#[test]
fn admin_routes_are_disabled_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--admin-token", ""]);
    let bytes = native("sst2-like-p8").to_bytes().unwrap();
    let r = server.put("/v1/admin/tasks/x", OCTET, &bytes, None);
    assert_eq!(
        (r.status, r.body["error_type"].as_str()),
        (403, Some("admin_disabled"))
    );
    assert!(r.body["error"].as_str().unwrap().contains("--admin-token"));
    assert!(server.tasks().is_empty());
}
