//! The prefixes shipped in `prefixes/` load on the default model and answer obvious cases right.

mod common;

use common::{engine, repo_root};
use prefixd::engine::TextInput;

fn classify(task: &str, texts: &[&str]) -> Vec<String> {
    let path = repo_root()
        .join("prefixes")
        .join(format!("{task}.safetensors"));
    let task = engine()
        .load_task(&path)
        .expect("shipped prefix loads and validates");
    let inputs: Vec<TextInput> = texts.iter().map(|t| TextInput::single(*t)).collect();
    engine()
        .classify_texts(&task, &inputs, 8)
        .unwrap()
        .into_iter()
        .map(|p| p.label)
        .collect()
}

#[test]
fn sst2_sentiment() {
    let got = classify(
        "sst2",
        &[
            "a gorgeous , witty and deeply moving film .",
            "dull , lifeless and badly acted .",
        ],
    );
    assert_eq!(got, ["positive", "negative"]);
}

#[test]
fn trec_question_types() {
    let got = classify(
        "trec",
        &[
            "Who wrote Hamlet ?",
            "Where is the Eiffel Tower ?",
            "How many legs does a spider have ?",
        ],
    );
    assert_eq!(got, ["HUM", "LOC", "NUM"]);
}

#[test]
fn sms_spam_filter() {
    let got = classify(
        "sms_spam",
        &[
            "WINNER!! You have been selected to receive a £900 prize reward! To claim call 09061701461 now",
            "Ok, see you at home for dinner tonight",
        ],
    );
    assert_eq!(got, ["spam", "ham"]);
}

#[test]
fn every_shipped_file_is_a_valid_prefix_for_the_default_model() {
    let dir = repo_root().join("prefixes");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let task = engine()
                .load_task(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(
                task.meta.source.kind,
                "train",
                "{}: trained by prefixd",
                path.display()
            );
            n += 1;
        }
    }
    assert!(n >= 3, "prefixes/ ships {n} prefixes");
}
