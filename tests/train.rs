//! `prefixd train` on tiny real data: gradients reach every prefix block, the loss goes down,
//! only the prefix and head change, the same seed gives the same file, and the result survives
//! export to PEFT and back with identical logits.

mod common;

use common::{engine, model_dir};
use prefixd::engine::Task;
use prefixd::engine::TextInput;
use prefixd::prefix::peft;
use prefixd::training::data::{self, Columns, LabelSpec};
use prefixd::training::{gradient_norms, train, Quiet, TrainConfig};
use std::path::{Path, PathBuf};

fn data_dir() -> PathBuf {
    common::fixtures_dir().join("../../data")
}

/// The first `n` rows of an SST-2 split as a temporary TSV.
fn sst2_head(split: &str, n: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(data_dir().join("sst2").join(format!("{split}.tsv")))
        .expect("SST-2 data in ../shared/data");
    let head: Vec<&str> = text.lines().take(n + 1).collect();
    let path = dir.path().join(format!("{split}.tsv"));
    std::fs::write(&path, head.join("\n") + "\n").unwrap();
    std::fs::copy(
        data_dir().join("sst2/labels.txt"),
        dir.path().join("labels.txt"),
    )
    .unwrap();
    (dir, path)
}

fn load(path: &Path) -> data::Dataset {
    data::load(path, &Columns::default(), &LabelSpec::Discover, false).unwrap()
}

fn tiny_config() -> TrainConfig {
    TrainConfig {
        task: "tiny".into(),
        virtual_tokens: 4,
        epochs: 6,
        lr: 1e-2,
        batch_size: 8,
        max_length: 32,
        dropout: 0.0,
        warmup_ratio: 0.0,
        ..Default::default()
    }
}

#[test]
fn every_prefix_block_and_the_head_receive_gradient() {
    let (_d, path) = sst2_head("train", 16);
    let norms = gradient_norms(engine(), &load(&path), &tiny_config()).unwrap();
    assert_eq!(norms.prefix.len(), 6);
    for (l, kv) in norms.prefix.iter().enumerate() {
        assert!(
            kv[0] > 0.0 && kv[1] > 0.0,
            "layer {l}: keys/values gradient {kv:?}"
        );
    }
    assert!(norms.head_weight > 0.0 && norms.head_bias > 0.0);
}

#[test]
fn loss_falls_only_prefix_and_head_change_and_the_seed_fixes_the_file() {
    let (_d, path) = sst2_head("train", 32);
    let ds = load(&path);
    let cfg = TrainConfig {
        epochs: 10,
        lr: 3e-2,
        ..tiny_config()
    };
    // The frozen model's output for a fixed prefix, before training.
    let probe = engine()
        .load_task(&common::fixtures_dir().join("sst2-like-p8"))
        .unwrap();
    let probe_input = [TextInput::single("a fixed probe sentence")];
    let before = engine().classify_texts(&probe, &probe_input, 1).unwrap();

    let (file, report) = train(engine(), &ds, Some(&ds), &cfg, &mut Quiet).unwrap();
    let losses: Vec<f64> = report.epochs.iter().map(|e| e.train_loss).collect();
    assert!(
        losses.windows(2).all(|w| w[1] < w[0]) && losses[9] < losses[0] * 0.7,
        "training loss should fall: {losses:?}"
    );
    let acc = report
        .epochs
        .last()
        .unwrap()
        .eval
        .as_ref()
        .unwrap()
        .accuracy;
    assert!(acc >= 0.75, "fits its 32 training rows: accuracy {acc}");

    // The base model is untouched: the same prefix gives the same logits as before.
    let after = engine().classify_texts(&probe, &probe_input, 1).unwrap();
    assert_eq!(before[0].logits, after[0].logits, "frozen weights changed");
    // The file holds a prefix and head for this model, with provenance.
    assert_eq!(file.meta.num_virtual_tokens, 4);
    assert_eq!(file.meta.labels, ["negative", "positive"]);
    assert_eq!(file.meta.source.kind, "train");
    assert!(file.meta.source.details.contains_key("settings"));
    assert_eq!(
        file.meta.base_model.fingerprint.as_deref(),
        Some(engine().model_info().fingerprint.as_str())
    );

    // Same seed, same bytes; another seed, another prefix.
    let (again, _) = train(engine(), &ds, Some(&ds), &cfg, &mut Quiet).unwrap();
    assert!(
        again.to_bytes().unwrap() == file.to_bytes().unwrap(),
        "same seed, different file"
    );
    let other = TrainConfig {
        seed: 7,
        ..cfg.clone()
    };
    let (different, _) = train(
        engine(),
        &ds,
        None,
        &TrainConfig { epochs: 1, ..other },
        &mut Quiet,
    )
    .unwrap();
    assert_ne!(different.prompt_embeddings, file.prompt_embeddings);
}

#[test]
fn projection_trains_and_folds_away_and_peft_round_trip_keeps_logits() {
    let (_d, path) = sst2_head("train", 16);
    let ds = load(&path);
    let cfg = TrainConfig {
        projection: Some(32),
        epochs: 2,
        ..tiny_config()
    };
    let (file, _) = train(engine(), &ds, None, &cfg, &mut Quiet).unwrap();
    // Folded: the stored prefix has PEFT's final shape, whatever the MLP was.
    assert_eq!(file.prompt_embeddings.shape, vec![4, 6 * 2 * 384]);
    assert_eq!(file.meta.source.details["prefix_projection"], true);

    let dir = tempfile::tempdir().unwrap();
    let _ = peft::export_dir(&file, dir.path()).unwrap();
    let reimported =
        peft::import_dir(dir.path(), &Default::default(), engine().model_info()).unwrap();
    let info = engine().model_info();
    let a = Task::from_file(&file, info, &file.to_bytes().unwrap()).unwrap();
    let b = Task::from_file(&reimported, info, &reimported.to_bytes().unwrap()).unwrap();
    let inputs: Vec<TextInput> = ds.examples.iter().map(|e| e.input.clone()).collect();
    let la = engine().classify_texts(&a, &inputs, 8).unwrap();
    let lb = engine().classify_texts(&b, &inputs, 8).unwrap();
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(x.logits, y.logits);
    }
    assert_eq!(
        b.labels(),
        ["negative", "positive"],
        "labels survive via prefixd.json"
    );
    // The file remembers its training truncation, and inputs for the task are cut to it.
    assert_eq!(file.meta.max_length, Some(32));
    let long = TextInput::single("word ".repeat(200));
    assert_eq!(
        engine().text_encoder().encode_for(&long, &a).unwrap().len(),
        32
    );
    assert_eq!(engine().text_encoder().encode(&long, 4).unwrap().len(), 128);
}

#[test]
fn data_files_in_every_format_and_bad_rows_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    std::fs::write(
        p("ok.tsv"),
        "sentence\tlabel\n\"quoted\" start\tpos\nplain\tneg\n",
    )
    .unwrap();
    let ds = data::load(
        &p("ok.tsv"),
        &Columns::default(),
        &LabelSpec::Discover,
        false,
    )
    .unwrap();
    assert_eq!(ds.labels, ["neg", "pos"], "sorted distinct names");
    assert_eq!(ds.examples[0].input.text, "\"quoted\" start");
    assert_eq!(ds.examples[0].label, 1);

    std::fs::write(p("ok.csv"), "text,other,label\n\"a, b\",x,1\nc,y,0\n").unwrap();
    let ds = data::load(
        &p("ok.csv"),
        &Columns::default(),
        &LabelSpec::Names(vec!["n".into(), "p".into()]),
        false,
    )
    .unwrap();
    assert_eq!(ds.examples[0].input.text, "a, b");
    assert_eq!(ds.examples[0].label, 1, "indices into the given names");

    std::fs::write(
        p("pairs.jsonl"),
        "{\"premise\": \"a\", \"hypothesis\": \"b\", \"y\": \"yes\"}\n",
    )
    .unwrap();
    let cols = Columns {
        text: Some("premise".into()),
        text_pair: Some("hypothesis".into()),
        label: Some("y".into()),
    };
    let ds = data::load(&p("pairs.jsonl"), &cols, &LabelSpec::Discover, false).unwrap();
    assert_eq!(ds.examples[0].input.text_pair.as_deref(), Some("b"));

    std::fs::write(
        p("bad.tsv"),
        "sentence\tlabel\nfine\t0\ntoo\tmany\tfields\nfine again\t1\nbad label\t7\n",
    )
    .unwrap();
    let err = data::load(
        &p("bad.tsv"),
        &Columns::default(),
        &LabelSpec::Names(vec!["a".into(), "b".into()]),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("2 malformed row(s)"), "{err}");
    assert!(err.contains("line 3: 3 fields"), "{err}");
    assert!(err.contains("line 5: label \"7\""), "{err}");
    let ds = data::load(
        &p("bad.tsv"),
        &Columns::default(),
        &LabelSpec::Names(vec!["a".into(), "b".into()]),
        true,
    )
    .unwrap();
    assert_eq!(ds.examples.len(), 2, "skipping keeps the good rows");
}

#[test]
fn train_and_eval_commands() {
    let (_d, path) = sst2_head("train", 24);
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("sst2.safetensors");
    let peft_dir = out.path().join("peft");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_prefixd"))
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (
            String::from_utf8(o.stdout).unwrap(),
            String::from_utf8(o.stderr).unwrap(),
        )
    };
    let model = model_dir();
    let (_, trained_log) = run(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--train",
        path.to_str().unwrap(),
        "--eval",
        path.to_str().unwrap(),
        "--task",
        "sst2",
        "-o",
        file.to_str().unwrap(),
        "--virtual-tokens",
        "4",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--log-every",
        "2",
        "--quiet",
        "--export-peft",
        peft_dir.to_str().unwrap(),
    ]);
    assert!(peft_dir.join("adapter_model.safetensors").is_file());
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("sst2.metrics.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(metrics["epochs"].as_array().unwrap().len(), 2);
    assert!(metrics["examples_per_s"].as_f64().unwrap() > 0.0);
    // 24 rows in batches of 8: 3 steps an epoch, 6 in all; the loss every 2 steps, with the
    // learning rate of the schedule at that step.
    let steps = metrics["steps"].as_array().unwrap();
    let at: Vec<u64> = steps.iter().map(|s| s["step"].as_u64().unwrap()).collect();
    assert_eq!(at, [2, 4, 6]);
    for s in steps {
        let t = s["step"].as_u64().unwrap() as usize;
        let want = prefixd::training::lr_at(1e-2, t - 1, 6, 1);
        assert!((s["lr"].as_f64().unwrap() - want).abs() < 1e-12, "{s}");
        let loss = s["loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{s}");
    }
    assert_eq!(steps[2]["epoch"], 2);
    // The learning curve beside the prefix, and the best epoch's per-class report.
    let svg = std::fs::read_to_string(out.path().join("sst2.curve.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg}"
    );
    for word in ["loss", "accuracy", "macro-F1", "optimizer step", "epoch"] {
        assert!(svg.contains(word), "the curve lacks {word:?}");
    }
    assert!(
        trained_log.contains("precision") && trained_log.contains("positive"),
        "{trained_log}"
    );
    let confusion = out.path().join("confusion.svg");
    let report: serde_json::Value = serde_json::from_str(
        &run(&[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--prefix",
            file.to_str().unwrap(),
            "--data",
            path.to_str().unwrap(),
            "--json",
            "--confusion-svg",
            confusion.to_str().unwrap(),
        ])
        .0,
    )
    .unwrap();
    let picture = std::fs::read_to_string(&confusion).unwrap();
    for row in report["confusion"].as_array().unwrap() {
        for n in row.as_array().unwrap() {
            assert!(
                picture.contains(&format!(">\n{n}\n</text>")),
                "the picture lacks the count {n}"
            );
        }
    }
    assert!(picture.contains("negative") && picture.contains("positive"));
    assert_eq!(report["examples"], 24);
    let acc = report["accuracy"].as_f64().unwrap();
    let best = metrics["best_epoch"].as_u64().unwrap() as usize - 1;
    let trained = metrics["epochs"][best]["eval"]["accuracy"]
        .as_f64()
        .unwrap();
    assert!(
        (acc - trained).abs() < 1e-9,
        "eval agrees with the trainer's own evaluation"
    );
    assert_eq!(report["confusion"].as_array().unwrap().len(), 2);
    let text = run(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--prefix",
        file.to_str().unwrap(),
        "--data",
        path.to_str().unwrap(),
    ])
    .0;
    assert!(text.contains("macro-F1") && text.contains("confusion"));
}
