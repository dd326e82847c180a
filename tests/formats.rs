//! Prefix files: PEFT import → native → export round trips, and every kind of bad file rejected
//! with an error that names the problem.

mod common;

use common::{cases, engine, fixtures_dir, CASES};
use prefixd::engine::Task;
use prefixd::engine::TextInput;
use prefixd::prefix::peft::{self, ImportOptions};
use prefixd::prefix::{HostTensor, PrefixFile, ProblemType};

fn import(case: &str, opts: &ImportOptions) -> PrefixFile {
    peft::import_dir(&fixtures_dir().join(case), opts, engine().model_info())
        .expect("fixture imports")
}

fn error_of(file: &PrefixFile) -> String {
    let bytes = file.to_bytes().expect("serializes");
    match Task::from_bytes(&bytes, engine().model_info()) {
        Ok(_) => panic!("a bad prefix file was accepted"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, words: &[&str]) {
    for w in words {
        assert!(msg.contains(w), "error {msg:?} should mention {w:?}");
    }
}

#[test]
fn import_native_export_round_trip_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    for case in CASES {
        let original = peft::import_dir(
            &fixtures_dir().join(case),
            &Default::default(),
            engine().model_info(),
        )
        .unwrap();
        // Through the native file on disk …
        let native = dir.path().join(format!("{case}.safetensors"));
        original.write(&native).unwrap();
        let reread = PrefixFile::read(&native).unwrap();
        assert_eq!(reread, original, "{case}: native file round trip");
        // … through the attention layout and back …
        let task =
            Task::from_bytes(&std::fs::read(&native).unwrap(), engine().model_info()).unwrap();
        assert_eq!(
            task.to_file().unwrap(),
            original,
            "{case}: layout round trip"
        );
        // … and out as a PEFT adapter, whose tensors equal the fixture's bit for bit.
        let out = dir.path().join(format!("{case}-peft"));
        let _ = peft::export_dir(&reread, &out).unwrap();
        for name in [
            "prompt_embeddings",
            "base_model.classifier.weight",
            "base_model.classifier.bias",
        ] {
            let a =
                std::fs::read(fixtures_dir().join(case).join("adapter_model.safetensors")).unwrap();
            let b = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
            let (a, b) = (
                safetensors::SafeTensors::deserialize(&a).unwrap(),
                safetensors::SafeTensors::deserialize(&b).unwrap(),
            );
            let (ta, tb) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
            assert_eq!(ta.shape(), tb.shape(), "{case}: {name} shape");
            assert_eq!(ta.dtype(), tb.dtype(), "{case}: {name} dtype");
            assert!(ta.data() == tb.data(), "{case}: {name} bytes differ");
        }
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(config["peft_type"], "PREFIX_TUNING");
        assert_eq!(config["task_type"], "SEQ_CLS");
        assert_eq!(
            config["num_virtual_tokens"],
            original.meta.num_virtual_tokens
        );
        // Re-importing the export gives the same tensors and keeps the labels.
        let again = peft::import_dir(&out, &Default::default(), engine().model_info()).unwrap();
        assert_eq!(again.prompt_embeddings, original.prompt_embeddings);
        assert_eq!(again.classifier_weight, original.classifier_weight);
        assert_eq!(again.classifier_bias, original.classifier_bias);
        assert_eq!(again.meta.labels, original.meta.labels);
    }
}

#[test]
fn serialization_is_deterministic() {
    // The file's hash is the task's version: the same content must give the same bytes.
    for case in CASES {
        let a = import(case, &Default::default()).to_bytes().unwrap();
        let b = import(case, &Default::default()).to_bytes().unwrap();
        assert!(a == b, "{case}: two serializations differ");
        assert_eq!(Task::version_of(&a), Task::version_of(&b));
    }
}

#[test]
fn native_file_and_peft_dir_give_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    for case in CASES {
        let native = dir.path().join(format!("{case}.safetensors"));
        import(case, &Default::default()).write(&native).unwrap();
        let from_file = engine().load_task(&native).unwrap();
        let from_dir = engine().load_task(&fixtures_dir().join(case)).unwrap();
        let inputs: Vec<TextInput> = cases(case).iter().map(|c| c.input()).collect();
        let a = engine().classify_texts(&from_file, &inputs, 8).unwrap();
        let b = engine().classify_texts(&from_dir, &inputs, 8).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.logits, y.logits, "{case}: native vs PEFT dir");
        }
    }
}

#[test]
fn labels_and_problem_type_given_at_import_are_kept() {
    let labels: Vec<String> = ["world", "sports", "business", "sci_tech"]
        .map(String::from)
        .into();
    let file = import(
        "multi4-p20",
        &ImportOptions {
            task: Some("news".into()),
            labels: Some(labels.clone()),
            problem_type: Some(ProblemType::MultiLabel),
            ..Default::default()
        },
    );
    assert_eq!(file.meta.task, "news");
    let task = Task::from_file(&file, engine().model_info(), &file.to_bytes().unwrap()).unwrap();
    let c = &cases("multi4-p20")[0];
    let p = &engine().classify_texts(&task, &[c.input()], 1).unwrap()[0];
    assert_eq!(p.label, labels[c.label]);
    for (s, l) in p.scores.iter().zip(&c.logits) {
        assert!(
            (s - prefixd::engine::sigmoid(*l)).abs() < 1e-5,
            "multi-label scores are sigmoids"
        );
    }
    // Wrong number of names for the classifier's rows.
    let err = peft::import_dir(
        &fixtures_dir().join("multi4-p20"),
        &ImportOptions {
            labels: Some(vec!["a".into(), "b".into()]),
            ..Default::default()
        },
        engine().model_info(),
    )
    .unwrap_err()
    .to_string();
    assert_mentions(&err, &["4 output rows", "2 label names"]);
}

#[test]
fn truncated_file_is_rejected() {
    let bytes = import("sst2-like-p8", &Default::default())
        .to_bytes()
        .unwrap();
    for cut in [bytes.len() / 2, 100, 7] {
        let err = Task::from_bytes(&bytes[..cut], engine().model_info())
            .unwrap_err()
            .to_string();
        assert_mentions(&err, &["not a valid safetensors file"]);
    }
    let err = Task::from_bytes(b"definitely not a prefix", engine().model_info())
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["not a valid safetensors file"]);
}

#[test]
fn prefix_for_a_twelve_layer_model_is_rejected() {
    let mut f = import("sst2-like-p8", &Default::default());
    let p = f.meta.num_virtual_tokens;
    f.meta.base_model.layers = 12;
    f.prompt_embeddings = HostTensor {
        shape: vec![p, 12 * 2 * 384],
        data: vec![0.1; p * 12 * 2 * 384],
    };
    assert_mentions(&error_of(&f), &["layers = 12", "loaded model has 6"]);
}

#[test]
fn wrong_hidden_size_is_rejected() {
    let mut f = import("sst2-like-p8", &Default::default());
    let p = f.meta.num_virtual_tokens;
    f.meta.base_model.hidden = 768;
    f.prompt_embeddings = HostTensor {
        shape: vec![p, 6 * 2 * 768],
        data: vec![0.1; p * 6 * 2 * 768],
    };
    f.classifier_weight = HostTensor {
        shape: vec![2, 768],
        data: vec![0.1; 2 * 768],
    };
    assert_mentions(
        &error_of(&f),
        &["hidden size = 768", "loaded model has 384"],
    );
    // A file whose tensor disagrees with its own metadata is caught before the model is asked.
    let mut g = import("sst2-like-p8", &Default::default());
    g.prompt_embeddings.shape = vec![4, 2 * g.prompt_embeddings.data.len() / 8];
    let err = error_of(&g);
    assert_mentions(&err, &["prompt_embeddings", "shape"]);
}

#[test]
fn nan_in_the_prefix_is_rejected() {
    let mut f = import("sst2-like-p8", &Default::default());
    f.prompt_embeddings.data[1234] = f32::NAN;
    assert_mentions(&error_of(&f), &["prompt_embeddings", "non-finite", "1234"]);
    let mut g = import("sst2-like-p8", &Default::default());
    g.classifier_bias.data[1] = f32::INFINITY;
    assert_mentions(&error_of(&g), &["base_model.classifier.bias", "non-finite"]);
}

#[test]
fn classifier_rows_must_match_label_names() {
    let mut f = import("proj-p10", &Default::default());
    f.meta.labels = vec!["a".into(), "b".into()];
    assert_mentions(&error_of(&f), &["3 output rows", "2 label names"]);
}

#[test]
fn mismatched_fingerprint_is_rejected() {
    let mut f = import("sst2-like-p8", &Default::default());
    assert_eq!(
        f.meta.base_model.fingerprint.as_deref(),
        Some("sha256:53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
        "the fingerprint is the sha256 of model.safetensors"
    );
    f.meta.base_model.fingerprint = Some(format!("sha256:{}", "0".repeat(64)));
    assert_mentions(
        &error_of(&f),
        &["base model weights", "sha256:0000", "sha256:53aa"],
    );
    // Without a fingerprint, any model of the right shape is accepted.
    f.meta.base_model.fingerprint = None;
    Task::from_bytes(&f.to_bytes().unwrap(), engine().model_info()).unwrap();
}

#[test]
fn a_peft_adapter_for_another_model_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures_dir().join("sst2-like-p8");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    std::fs::write(
        dir.path().join("adapter_config.json"),
        config.replace("\"num_layers\": 6", "\"num_layers\": 12"),
    )
    .unwrap();
    let err = peft::import_dir(dir.path(), &Default::default(), engine().model_info())
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["num_layers = 12", "loaded model", "6"]);
}

#[test]
fn a_500_token_input_with_p20_is_truncated_to_fit() {
    // Default max length (512): the model's 512 positions minus P = 20 leave 492 tokens.
    let engine =
        prefixd::engine::Engine::load(&prefixd::engine::EngineConfig::new(common::model_dir()))
            .unwrap();
    let task = engine
        .load_task(&fixtures_dir().join("multi4-p20"))
        .unwrap();
    let long = "the quick brown fox jumps over the lazy dog ".repeat(60); // ~540 tokens
    let enc = engine
        .text_encoder()
        .encode(&TextInput::single(long.clone()), 20)
        .unwrap();
    assert_eq!(enc.ids.len(), 492);
    assert_eq!(
        *enc.ids.last().unwrap(),
        102,
        "ends with [SEP] after truncation"
    );
    let pair = TextInput::pair(long.clone(), long.clone());
    let enc = engine.text_encoder().encode(&pair, 20).unwrap();
    assert_eq!(enc.ids.len(), 492);
    let preds = engine
        .classify_texts(
            &task,
            &[TextInput::single(long), pair, TextInput::single("")],
            4,
        )
        .unwrap();
    assert_eq!(preds.len(), 3);
    assert!(preds.iter().all(|p| p.logits.iter().all(|x| x.is_finite())));
}
