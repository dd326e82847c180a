//! Labelled examples from TSV, CSV or JSONL files.
//!
//! TSV is split on tabs with no quoting (text may start with `"`, as in `../shared/data`); CSV
//! follows RFC 4180 quoting; JSONL holds one object per line. Labels may be indices or names.
//! Every row is checked before training starts, and a bad one is reported with its line number.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::engine::TextInput;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: {count} malformed row(s):\n{lines}")]
    Rows {
        path: PathBuf,
        count: usize,
        lines: String,
    },
}

/// Which columns (or JSON fields) hold what. `None` picks the usual names.
#[derive(Debug, Clone, Default)]
pub struct Columns {
    /// Default: `sentence`, `text` or `sentence1`, whichever the file has.
    pub text: Option<String>,
    /// Default: `sentence2` when the text column is `sentence1`, else none.
    pub text_pair: Option<String>,
    /// Default: `label`.
    pub label: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Example {
    pub input: TextInput,
    pub label: usize,
    /// 1-based line in the source file, for messages.
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub examples: Vec<Example>,
    pub labels: Vec<String>,
}

/// One parsed row before labels are resolved.
struct RawRow {
    line: usize,
    text: String,
    pair: Option<String>,
    label: String,
}

enum Format {
    Tsv,
    Csv,
    Jsonl,
}

fn format_of(path: &Path) -> Result<Format, DataError> {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "tsv" | "tab" => Ok(Format::Tsv),
        "csv" => Ok(Format::Csv),
        "jsonl" | "ndjson" | "json" => Ok(Format::Jsonl),
        other => Err(DataError::File {
            path: path.to_path_buf(),
            message: format!("unknown data format {other:?}: use .tsv, .csv or .jsonl"),
        }),
    }
}

/// Reads a file's rows; `bad` collects (line, problem) for malformed ones.
fn read_rows(
    path: &Path,
    cols: &Columns,
    bad: &mut Vec<(usize, String)>,
) -> Result<Vec<RawRow>, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file_err = |message: String| DataError::File {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(io)?;
    let mut rows = Vec::new();
    match format_of(path)? {
        Format::Jsonl => {
            let (tc, lc) = (
                cols.text.clone().unwrap_or_else(|| "text".into()),
                cols.label.clone().unwrap_or_else(|| "label".into()),
            );
            for (i, line) in text.lines().enumerate() {
                let n = i + 1;
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = match serde_json::from_str(line) {
                    Ok(v) => v,
                    Err(e) => {
                        bad.push((n, format!("not JSON: {e}")));
                        continue;
                    }
                };
                let field = |name: &str| match v.get(name) {
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Number(x)) => Some(x.to_string()),
                    _ => None,
                };
                let text =
                    field(&tc).or_else(|| cols.text.is_none().then(|| field("sentence")).flatten());
                match (text, field(&lc)) {
                    (Some(text), Some(label)) => rows.push(RawRow {
                        line: n,
                        text,
                        pair: cols.text_pair.as_deref().and_then(field),
                        label,
                    }),
                    _ => bad.push((n, format!("needs string field {tc:?} and field {lc:?}"))),
                }
            }
        }
        fmt => {
            let records: Vec<(usize, Vec<String>)> = match fmt {
                Format::Tsv => text
                    .lines()
                    .enumerate()
                    .filter(|(_, l)| !l.is_empty())
                    .map(|(i, l)| (i + 1, l.split('\t').map(str::to_string).collect()))
                    .collect(),
                _ => {
                    let mut reader = csv::ReaderBuilder::new()
                        .has_headers(false)
                        .flexible(true)
                        .from_reader(text.as_bytes());
                    let mut out = Vec::new();
                    for r in reader.records() {
                        let r = r.map_err(|e| file_err(format!("CSV: {e}")))?;
                        let line = r.position().map_or(0, |p| p.line() as usize);
                        out.push((line, r.iter().map(str::to_string).collect()));
                    }
                    out
                }
            };
            let Some(((_, header), body)) = records.split_first() else {
                return Err(file_err("empty file (a header line is needed)".into()));
            };
            let find = |name: &str| header.iter().position(|h| h == name);
            let text_col = match &cols.text {
                Some(c) => find(c).ok_or_else(|| file_err(format!("no column {c:?} in header {header:?}")))?,
                None => ["sentence", "text", "sentence1"]
                    .iter()
                    .find_map(|c| find(c))
                    .ok_or_else(|| file_err(format!("no text column (sentence, text, sentence1) in header {header:?}; use --text-column")))?,
            };
            let pair_col = match &cols.text_pair {
                Some(c) => Some(
                    find(c)
                        .ok_or_else(|| file_err(format!("no column {c:?} in header {header:?}")))?,
                ),
                None if header[text_col] == "sentence1" => find("sentence2"),
                None => None,
            };
            let lc = cols.label.clone().unwrap_or_else(|| "label".into());
            let label_col = find(&lc)
                .ok_or_else(|| file_err(format!("no label column {lc:?} in header {header:?}")))?;
            for (n, fields) in body {
                if fields.len() != header.len() {
                    bad.push((
                        *n,
                        format!("{} fields, the header has {}", fields.len(), header.len()),
                    ));
                    continue;
                }
                rows.push(RawRow {
                    line: *n,
                    text: fields[text_col].clone(),
                    pair: pair_col.map(|c| fields[c].clone()),
                    label: fields[label_col].trim().to_string(),
                });
            }
        }
    }
    Ok(rows)
}

/// How label values in the data map to names.
#[derive(Debug, Clone)]
pub enum LabelSpec {
    /// These names, in index order (from the command line, a prefix file, or `labels.txt`).
    Names(Vec<String>),
    /// Find them: `labels.txt` beside the data if present, else the sorted distinct values.
    Discover,
}

/// Loads a dataset. With `skip_bad`, malformed rows are reported on stderr and skipped;
/// otherwise any malformed row fails the load, listing the first ten by line number.
pub fn load(
    path: &Path,
    cols: &Columns,
    spec: &LabelSpec,
    skip_bad: bool,
) -> Result<Dataset, DataError> {
    let mut bad = Vec::new();
    let rows = read_rows(path, cols, &mut bad)?;
    let labels = match spec {
        LabelSpec::Names(n) => n.clone(),
        LabelSpec::Discover => {
            let beside = path.parent().unwrap_or(Path::new(".")).join("labels.txt");
            if beside.is_file() {
                std::fs::read_to_string(&beside)
                    .map_err(|source| DataError::Io {
                        path: beside.clone(),
                        source,
                    })?
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect()
            } else {
                let found: BTreeSet<&str> = rows.iter().map(|r| r.label.as_str()).collect();
                let mut found: Vec<String> = found.into_iter().map(str::to_string).collect();
                // Numeric labels sort as numbers, so "10" follows "9".
                if found.iter().all(|l| l.parse::<u64>().is_ok()) {
                    found.sort_by_key(|l| l.parse::<u64>().unwrap_or(0));
                }
                found
            }
        }
    };
    if labels.is_empty() {
        return Err(DataError::File {
            path: path.to_path_buf(),
            message: "no labels found".into(),
        });
    }
    let mut examples = Vec::with_capacity(rows.len());
    for r in rows {
        // A label is a name in the list, or else an index into it.
        let id = labels
            .iter()
            .position(|l| *l == r.label)
            .or_else(|| r.label.parse::<usize>().ok().filter(|&i| i < labels.len()));
        match id {
            Some(label) => examples.push(Example {
                input: TextInput {
                    text: r.text,
                    text_pair: r.pair,
                },
                label,
                line: r.line,
            }),
            None => bad.push((
                r.line,
                format!(
                    "label {:?} is neither one of {labels:?} nor an index into them",
                    r.label
                ),
            )),
        }
    }
    if !bad.is_empty() {
        bad.sort();
        let lines: Vec<String> = bad
            .iter()
            .map(|(n, m)| format!("  line {n}: {m}"))
            .collect();
        if !skip_bad {
            return Err(DataError::Rows {
                path: path.to_path_buf(),
                count: bad.len(),
                lines: lines
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n"),
            });
        }
        for l in &lines {
            eprintln!("{}: skipped{l}", path.display());
        }
    }
    if examples.is_empty() {
        return Err(DataError::File {
            path: path.to_path_buf(),
            message: "no usable examples".into(),
        });
    }
    Ok(Dataset {
        path: path.to_path_buf(),
        examples,
        labels,
    })
}
