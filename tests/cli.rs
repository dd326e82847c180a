//! The `prefixd` binary end to end: classify, import-peft, export-peft, inspect, bench.

mod common;

use common::{cases, fixtures_dir, max_abs_diff, model_dir};
use std::io::Write;
use std::process::{Command, Stdio};

fn prefixd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_prefixd"))
        .args(args)
        .output()
        .expect("prefixd runs")
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "prefixd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn import_inspect_classify_export() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir();
    let model = model.to_str().unwrap();
    let adapter = fixtures_dir().join("multi4-p20");
    let native = tmp.path().join("news.safetensors");
    ok(prefixd(&[
        "import-peft",
        adapter.to_str().unwrap(),
        "--model",
        model,
        "--task",
        "news",
        "--labels",
        "world,sports,business,sci_tech",
        "-o",
        native.to_str().unwrap(),
    ]));

    let summary = ok(prefixd(&["inspect", native.to_str().unwrap()]));
    for want in [
        "news",
        "world, sports, business, sci_tech",
        "virtual tokens: 20",
        "6 layers",
        "peft_import",
    ] {
        assert!(
            summary.contains(want),
            "inspect output lacks {want:?}:\n{summary}"
        );
    }

    // Many inputs through --input -, one JSON line out per line in, in order.
    let cs = cases("multi4-p20");
    let mut child = Command::new(env!("CARGO_BIN_EXE_prefixd"))
        .args([
            "classify",
            "--model",
            model,
            "--max-length",
            "128",
            "--prefix",
        ])
        .arg(&native)
        .args(["--input", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for c in &cs {
            serde_json::to_writer(&mut stdin, &c.input()).unwrap();
            stdin.write_all(b"\n").unwrap();
        }
    }
    let out = ok(child.wait_with_output().unwrap());
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), cs.len());
    let names = ["world", "sports", "business", "sci_tech"];
    for (c, v) in cs.iter().zip(&lines) {
        let logits: Vec<f32> = serde_json::from_value(v["logits"].clone()).unwrap();
        assert!(max_abs_diff(&logits, &c.logits) <= 1e-4);
        assert_eq!(v["label_id"], c.label);
        assert_eq!(v["label"], names[c.label]);
        assert_eq!(v["scores"].as_array().unwrap().len(), 4);
    }

    // --text / --text-pair on the PEFT directory directly.
    let pair = cs.iter().find(|c| c.text_pair.is_some()).unwrap();
    let out = ok(prefixd(&[
        "classify",
        "--model",
        model,
        "--max-length",
        "128",
        "--prefix",
        adapter.to_str().unwrap(),
        "--text",
        &pair.text,
        "--text-pair",
        pair.text_pair.as_deref().unwrap(),
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let logits: Vec<f32> = serde_json::from_value(v["logits"].clone()).unwrap();
    assert!(max_abs_diff(&logits, &pair.logits) <= 1e-4);

    let exported = tmp.path().join("news-peft");
    ok(prefixd(&[
        "export-peft",
        native.to_str().unwrap(),
        "-o",
        exported.to_str().unwrap(),
    ]));
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(exported.join(f).is_file(), "export wrote {f}");
    }
}

#[test]
fn bad_inputs_fail_with_a_message() {
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let garbage = tmp.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    let out = prefixd(&[
        "classify",
        "--model",
        model.to_str().unwrap(),
        "--prefix",
        garbage.to_str().unwrap(),
        "--text",
        "hi",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a valid safetensors file"), "{err}");

    let out = prefixd(&["inspect", "/nonexistent.safetensors"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.safetensors"));
}

#[test]
fn bench_prints_one_json_object() {
    let out = ok(prefixd(&[
        "bench",
        "--model",
        model_dir().to_str().unwrap(),
        "--batch",
        "2",
        "--seq-len",
        "8",
        "--tasks",
        "2",
        "--seconds",
        "0",
        "--warmup",
        "1",
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for key in [
        "seq_per_s",
        "tokens_per_s",
        "median_batch_ms",
        "batch",
        "seq_len",
        "prefix_len",
        "tasks",
    ] {
        assert!(v.get(key).is_some(), "bench output lacks {key}: {out}");
    }
    assert!(v["seq_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn classify_runs_mixed_task_batches_in_input_order() {
    // Three PEFT adapters (P = 8, 20, 10) given at once; the input lines interleave their tasks,
    // so every forward pass of 7 rows mixes tasks and prefix lengths.
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("mixed.jsonl");
    let mut want = Vec::new();
    {
        let mut f = std::fs::File::create(&input).unwrap();
        let per: Vec<_> = common::CASES.iter().map(|c| (c, cases(c))).collect();
        for i in 0..per.iter().map(|(_, cs)| cs.len()).max().unwrap() {
            for (name, cs) in &per {
                if let Some(c) = cs.get(i) {
                    let mut line = serde_json::to_value(c.input()).unwrap();
                    line["task"] = (**name).into();
                    writeln!(f, "{line}").unwrap();
                    want.push((name.to_string(), c.logits.clone()));
                }
            }
        }
    }
    let mut args = vec![
        "classify".to_string(),
        "--model".into(),
        model.display().to_string(),
    ];
    args.extend([
        "--max-length".into(),
        "128".into(),
        "--batch-size".into(),
        "7".into(),
    ]);
    for c in common::CASES {
        args.extend([
            "--prefix".into(),
            fixtures_dir().join(c).display().to_string(),
        ]);
    }
    args.extend(["--input".into(), input.display().to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok(prefixd(&refs));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), want.len());
    for ((task, logits), v) in want.iter().zip(&lines) {
        assert_eq!(v["task"], task.as_str());
        let got: Vec<f32> = serde_json::from_value(v["logits"].clone()).unwrap();
        assert!(
            max_abs_diff(&got, logits) <= 1e-4,
            "{task}: {got:?} vs {logits:?}"
        );
    }

    // A line without a task, or naming one not given, is refused with its line number.
    std::fs::write(&input, "{\"text\": \"hello\", \"task\": \"nope\"}\n").unwrap();
    let out = prefixd(&refs);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("input 1") && err.contains("\"nope\""), "{err}");
}
