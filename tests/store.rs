//! Replicas sharing one prefix store: real `prefixd serve` processes over a real S3 server (moto,
//! on 127.0.0.1), the tiny model. Convergence times are printed (`--nocapture` shows them).

mod common;

use common::s3::{Moto, Proxy};
use common::server::Server;
use common::tiny;
use std::path::Path;
use std::time::{Duration, Instant};

const TEXT: &str = "the store is the truth";
const OCTET: &str = "application/octet-stream";
const BUCKET: &str = "fleet";
/// Short, so the tests are quick; the default is 5 s.
const SYNC: Duration = Duration::from_millis(500);

fn replica(endpoint: &str, bucket: &str, cache: &Path, extra: &[&str]) -> Server {
    replica_as(("test", "test"), endpoint, bucket, cache, extra)
}

fn replica_as(
    (key, secret): (&str, &str),
    endpoint: &str,
    bucket: &str,
    cache: &Path,
    extra: &[&str],
) -> Server {
    let url = format!("s3://{bucket}/prefixes/");
    let interval = format!("{}", SYNC.as_secs_f64());
    let mut args = vec![
        "--prefix-cache",
        cache.to_str().unwrap(),
        "--s3-endpoint",
        endpoint,
        "--sync-interval",
        &interval,
        "--store-timeout",
        "2",
    ];
    args.extend_from_slice(extra);
    let server = Server::start_from(&tiny::model_dir(), url.as_ref(), cache, &args, |cmd| {
        cmd.env("AWS_ACCESS_KEY_ID", key)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("AWS_REGION", "us-east-1");
    });
    server.eventually("readiness (first sync)", |s| s.get("/ready").status == 200);
    server
}

fn native(name: &str, seed: u64) -> Vec<u8> {
    tiny::prefix(name, 3, 2, seed).to_bytes().unwrap()
}

fn version_on(server: &Server, task: &str) -> Option<String> {
    let r = server.get(&format!("/v1/tasks/{task}"));
    (r.status == 200).then(|| r.body["version"].as_str().unwrap().to_string())
}

/// Polls until `f` holds or `limit` passes; returns how long it took.
fn within(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// Upload, replace and delete through A; B follows within the sync interval plus a second. An
/// object written into the bucket by someone else appears on both.
#[test]
fn two_replicas_converge_on_one_bucket() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let (ca, cb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = replica(&moto.endpoint, BUCKET, ca.path(), &[]);
    let b = replica(&moto.endpoint, BUCKET, cb.path(), &[]);
    assert!(a.tasks().is_empty() && b.tasks().is_empty());
    let bound = SYNC + Duration::from_secs(1);

    let r = a.put("/v1/admin/tasks/spam", OCTET, &native("spam", 1), None);
    assert_eq!(r.status, 200, "{}", r.text);
    let v1 = r.body["version"].as_str().unwrap().to_string();
    assert_eq!(version_on(&a, "spam").as_deref(), Some(v1.as_str()));
    let took = within("upload on A servable on B", bound, || {
        version_on(&b, "spam").as_deref() == Some(v1.as_str())
    });
    println!("convergence: upload through A servable on B after {took:?}");
    assert_eq!(a.logits("spam", TEXT), b.logits("spam", TEXT));
    // The store holds exactly the file A validated; each cache holds a copy.
    let stored = moto
        .get_object(BUCKET, "prefixes/spam.safetensors")
        .unwrap();
    assert_eq!(
        std::fs::read(ca.path().join("spam.safetensors")).unwrap(),
        stored
    );
    assert_eq!(
        std::fs::read(cb.path().join("spam.safetensors")).unwrap(),
        stored
    );

    let r = a.put("/v1/admin/tasks/spam", OCTET, &native("spam", 2), None);
    assert_eq!(r.status, 200, "{}", r.text);
    let v2 = r.body["version"].as_str().unwrap().to_string();
    assert_ne!(v1, v2);
    let took = within("replacement on B", bound, || {
        version_on(&b, "spam").as_deref() == Some(v2.as_str())
    });
    println!("convergence: replacement through A on B after {took:?}");
    assert_eq!(a.logits("spam", TEXT), b.logits("spam", TEXT));

    // A third party writes the bucket directly (a CI job, `aws s3 cp`).
    moto.put_object(BUCKET, "prefixes/news.safetensors", &native("news", 3));
    within("a direct write on both", bound, || {
        version_on(&a, "news").is_some() && version_on(&b, "news").is_some()
    });

    let r = a.delete("/v1/admin/tasks/spam", None);
    assert_eq!(r.status, 204, "{}", r.text);
    assert!(version_on(&a, "spam").is_none());
    let took = within("delete on B", bound, || version_on(&b, "spam").is_none());
    println!("convergence: delete through A gone from B after {took:?}");
    assert!(moto
        .get_object(BUCKET, "prefixes/spam.safetensors")
        .is_none());
    assert!(!cb.path().join("spam.safetensors").exists());
    assert_eq!(b.tasks().len(), 1);

    // The sync loop reports itself.
    let listing = b.get("/v1/tasks").body;
    assert_eq!(listing["store"]["stale"], false, "{listing}");
    assert_eq!(listing["store"]["url"], "s3://fleet/prefixes/");
    assert!(b.metric("prefixd_store_syncs_total{result=\"ok\"}") >= 2.0);
    assert_eq!(b.metric("prefixd_store_stale"), 0.0);
    assert!(b.metric("prefixd_prefix_loads_total{origin=\"store\",result=\"ok\"}") >= 3.0);
}

/// Bad objects in the store are skipped, counted once, and the last good version keeps serving
/// on every replica.
#[test]
fn bad_objects_leave_the_previous_version_serving() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let (ca, cb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = replica(
        &moto.endpoint,
        BUCKET,
        ca.path(),
        &["--max-upload-bytes", "200000"],
    );
    let b = replica(
        &moto.endpoint,
        BUCKET,
        cb.path(),
        &["--max-upload-bytes", "200000"],
    );
    let r = a.put("/v1/admin/tasks/spam", OCTET, &native("spam", 1), None);
    assert_eq!(r.status, 200, "{}", r.text);
    let good = r.body["version"].as_str().unwrap().to_string();
    within("B has spam", Duration::from_secs(3), || {
        version_on(&b, "spam").is_some()
    });
    let before = b.logits("spam", TEXT);

    // Garbage, a prefix for another model (hidden size), an object over the size limit, and a
    // key that is no task name.
    moto.put_object(
        BUCKET,
        "prefixes/spam.safetensors",
        b"not a safetensors file at all",
    );
    moto.put_object(BUCKET, "prefixes/huge.safetensors", &vec![7u8; 300_000]);
    moto.put_object(BUCKET, "prefixes/bad%20name.safetensors", &native("x", 4));
    moto.put_object(BUCKET, "prefixes/notes.txt", b"left alone");
    let errors =
        |s: &Server| s.metric("prefixd_prefix_loads_total{origin=\"store\",result=\"error\"}");
    within("both count the bad objects", Duration::from_secs(5), || {
        errors(&a) >= 2.0 && errors(&b) >= 2.0
    });
    // Several more passes: each bad version is counted once, not once a pass.
    std::thread::sleep(SYNC * 4);
    assert_eq!(errors(&a), 2.0);
    assert_eq!(errors(&b), 2.0);
    for s in [&a, &b] {
        assert_eq!(version_on(s, "spam").as_deref(), Some(good.as_str()));
        assert!(version_on(s, "huge").is_none());
        assert_eq!(s.tasks().len(), 1);
        assert_eq!(s.get("/v1/tasks").body["store"]["stale"], false);
    }
    assert_eq!(b.logits("spam", TEXT), before);
    // The caches kept the good file, so a restart would serve it too.
    assert_eq!(
        std::fs::read(cb.path().join("spam.safetensors")).unwrap(),
        native("spam", 1)
    );

    // A good object replaces it again everywhere.
    moto.put_object(BUCKET, "prefixes/spam.safetensors", &native("spam", 5));
    within("the fixed object on both", Duration::from_secs(3), || {
        [&a, &b]
            .iter()
            .all(|s| version_on(s, "spam").is_some_and(|v| v != good))
    });

    // An upload that breaks the limit or the format is refused before the store is touched.
    let r = a.put("/v1/admin/tasks/bad.name", OCTET, b"junk", None);
    assert_eq!(r.status, 422, "{}", r.text);
    assert!(moto
        .get_object(BUCKET, "prefixes/bad.name.safetensors")
        .is_none());
}

/// The store goes away: both replicas keep serving and say they are stale; uploads fail with a
/// JSON 502 and change nothing; a replica restarted meanwhile serves from its cache; all recover
/// when the store returns.
#[test]
fn replicas_outlive_the_store() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let proxy = Proxy::start(&moto.endpoint);
    let (ca, cb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = replica(&proxy.endpoint, BUCKET, ca.path(), &[]);
    let b = replica(&proxy.endpoint, BUCKET, cb.path(), &[]);
    for (name, seed) in [("spam", 1), ("news", 2)] {
        let r = a.put(
            &format!("/v1/admin/tasks/{name}"),
            OCTET,
            &native(name, seed),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.text);
    }
    within("B has both", Duration::from_secs(3), || {
        b.tasks().len() == 2
    });
    let served = b.tasks();
    let spam = b.logits("spam", TEXT);

    proxy.set_up(false);
    let stale = |s: &Server| s.get("/v1/tasks").body["store"]["stale"] == true;
    within("both stale", Duration::from_secs(10), || {
        stale(&a) && stale(&b)
    });
    assert_eq!(b.metric("prefixd_store_stale"), 1.0);
    assert!(b.metric("prefixd_store_syncs_total{result=\"error\"}") >= 1.0);
    std::thread::sleep(SYNC * 3);
    assert_eq!(a.tasks(), served);
    assert_eq!(b.tasks(), served);
    assert_eq!(b.logits("spam", TEXT), spam);
    assert_eq!(b.get("/ready").status, 200, "serving what it has is ready");
    assert!(b.get("/v1/tasks").body["store"]["error"].is_string());

    let r = a.put("/v1/admin/tasks/late", OCTET, &native("late", 3), None);
    assert_eq!(r.status, 502, "{}", r.text);
    assert_eq!(r.body["error_type"], "store_unavailable", "{}", r.text);
    let r = a.delete("/v1/admin/tasks/spam", None);
    assert_eq!(r.status, 502, "{}", r.text);
    assert_eq!(a.tasks(), served, "a failed write changes nothing");

    // B restarts while the store is down: its cache serves, and it is ready after one failed pass.
    drop(b);
    let b = replica(&proxy.endpoint, BUCKET, cb.path(), &[]);
    assert_eq!(b.tasks(), served);
    assert_eq!(b.logits("spam", TEXT), spam);
    assert!(stale(&b));

    // A change made while they were cut off reaches both once the store is back.
    moto.put_object(BUCKET, "prefixes/late.safetensors", &native("late", 3));
    proxy.set_up(true);
    let took = within("both fresh again", Duration::from_secs(15), || {
        !stale(&a) && !stale(&b) && a.tasks().len() == 3 && b.tasks().len() == 3
    });
    println!("recovery: store back, both replicas fresh after {took:?}");
    assert_eq!(b.metric("prefixd_store_stale"), 0.0);
    let r = a.put("/v1/admin/tasks/after", OCTET, &native("after", 4), None);
    assert_eq!(r.status, 200, "{}", r.text);
}

/// A replica whose store does not exist (wrong bucket) starts, says why in its status, and
/// refuses uploads with the store's reason; a restart with a warm cache fetches nothing again.
#[test]
fn a_wrong_bucket_is_a_clear_error_and_a_warm_restart_fetches_nothing() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let cache = tempfile::tempdir().unwrap();
    let wrong = replica(&moto.endpoint, "no-such-bucket", cache.path(), &[]);
    let status = wrong.get("/v1/tasks").body["store"].clone();
    assert_eq!(status["stale"], true, "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(
        error.contains("NoSuchBucket") || error.contains("not found"),
        "{error}"
    );
    let r = wrong.put("/v1/admin/tasks/spam", OCTET, &native("spam", 1), None);
    assert_eq!(r.status, 502, "{}", r.text);
    drop(wrong);

    let cache = tempfile::tempdir().unwrap();
    for i in 0..5 {
        let name = format!("t{i}");
        moto.put_object(
            BUCKET,
            &format!("prefixes/{name}.safetensors"),
            &native(&name, i),
        );
    }
    let first = replica(&moto.endpoint, BUCKET, cache.path(), &[]);
    assert_eq!(first.tasks().len(), 5, "ready means the first pass is done");
    assert_eq!(
        first.metric("prefixd_prefix_loads_total{origin=\"store\",result=\"ok\"}"),
        5.0
    );
    drop(first);
    let again = replica(&moto.endpoint, BUCKET, cache.path(), &[]);
    assert_eq!(again.tasks().len(), 5);
    again.eventually("all resident", |s| {
        s.metric("prefixd_resident_tasks") == 5.0
    });
    assert_eq!(
        again.metric("prefixd_prefix_loads_total{origin=\"store\",result=\"ok\"}"),
        0.0,
        "the cache and its manifest matched the store: nothing fetched"
    );
    assert_eq!(
        again.metric("prefixd_prefix_loads_total{origin=\"startup\",result=\"ok\"}"),
        5.0
    );
}

/// With a store that checks signatures (moto with authentication on): wrong credentials leave a
/// replica up, stale, saying why, and its uploads refused with nothing written; the right ones
/// work alongside it.
#[test]
fn wrong_credentials_are_a_clear_error_and_change_nothing() {
    let (moto, (key, secret)) = Moto::start_with_auth(BUCKET);
    let (cr, cw) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let right = replica_as((&key, &secret), &moto.endpoint, BUCKET, cr.path(), &[]);
    let wrong = replica_as(
        (&key, "not-the-secret"),
        &moto.endpoint,
        BUCKET,
        cw.path(),
        &[],
    );

    let status = wrong.get("/v1/tasks").body["store"].clone();
    assert_eq!(status["stale"], true, "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(
        error.contains("SignatureDoesNotMatch") || error.contains("403"),
        "{error}"
    );
    let r = wrong.put("/v1/admin/tasks/spam", OCTET, &native("spam", 1), None);
    assert_eq!(r.status, 502, "{}", r.text);
    assert_eq!(r.body["error_type"], "store_unavailable");
    assert!(wrong.tasks().is_empty());

    let r = right.put("/v1/admin/tasks/spam", OCTET, &native("spam", 1), None);
    assert_eq!(r.status, 200, "{}", r.text);
    std::thread::sleep(SYNC * 3);
    assert_eq!(right.get("/v1/tasks").body["store"]["stale"], false);
    assert!(
        wrong.tasks().is_empty(),
        "nothing reaches a replica the store refuses"
    );
    assert_eq!(wrong.get("/ready").status, 200);
}
