//! A prefix store in object storage: `s3://bucket/path/`, `gs://…`, `az://…` or `file:///…`.
//!
//! The store holds one native prefix file per task, `<path>/<task>.safetensors`, and is the
//! fleet's source of truth (see `sync.rs`). This module is only the thin, bounded client over the
//! `object_store` crate: list, get (size-capped while streaming), put, delete, each under a
//! deadline, so a store that hangs costs a sync pass or an upload some seconds, never a thread.
//! An S3 PUT is atomic — a reader sees the old object or the new one, never half — which is what
//! makes the store safe to write while other replicas read it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};

use super::{valid_task_name, EXTENSION};

/// How to reach a prefix store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `s3://bucket/path/`, `gs://bucket/path/`, `az://container/path/` or `file:///dir/`.
    pub url: String,
    /// An S3-compatible server's address (MinIO, Ceph, moto…); also `AWS_ENDPOINT_URL`.
    pub s3_endpoint: Option<String>,
    /// Longest time for one request to the store (a GET of one object included).
    pub request_timeout: Duration,
}

impl StoreConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            s3_endpoint: None,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Whether `--prefixes` names an object store rather than a local folder.
pub fn is_store_url(s: &str) -> bool {
    ["s3://", "s3a://", "gs://", "az://", "abfs://", "file://"]
        .iter()
        .any(|scheme| s.starts_with(scheme))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("prefix store URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("prefix store: {0}")]
    Store(#[from] object_store::Error),
    #[error("prefix store: no answer within {0:?}")]
    Timeout(Duration),
    #[error("prefix store object {key}: {size} bytes, over the limit of {max}")]
    TooLarge { key: String, size: u64, max: u64 },
}

/// One prefix object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub task: String,
    /// What identifies this version of the object: the ETag (or, where a store has none, the
    /// modification time and size).
    pub tag: String,
    pub size: u64,
}

/// The listing sorted into what can be a task and what cannot.
#[derive(Debug, Default)]
pub struct Listing {
    pub tasks: Vec<Listed>,
    /// Keys ending in `.safetensors` whose name is not a valid task name.
    pub bad_names: Vec<String>,
}

#[derive(Clone)]
pub struct PrefixStore {
    inner: Arc<dyn ObjectStore>,
    root: ObjectPath,
    url: String,
    timeout: Duration,
}

impl std::fmt::Debug for PrefixStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixStore")
            .field("url", &self.url)
            .finish()
    }
}

impl PrefixStore {
    /// Builds the client. Credentials and region come from the provider's standard variables
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, …;
    /// `GOOGLE_*`; `AZURE_*`). Nothing is contacted yet.
    pub fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        let url = config.url.trim();
        let bad = |why: &str| StoreError::Url {
            url: url.to_string(),
            why: why.to_string(),
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let client = ClientOptions::new()
            .with_timeout(config.request_timeout)
            .with_connect_timeout(config.request_timeout.min(Duration::from_secs(5)));
        // Few, quick retries: a sync pass that fails is retried at the next interval anyway, and
        // an upload should fail while its client is still waiting.
        let retry = RetryConfig {
            max_retries: 2,
            retry_timeout: config.request_timeout,
            ..Default::default()
        };
        let (inner, root): (Arc<dyn ObjectStore>, &str) = match scheme {
            "s3" | "s3a" => {
                let mut b = s3_from_env()
                    .with_url(url)
                    .with_client_options(client)
                    .with_retry(retry);
                if let Some(endpoint) = config.s3_endpoint.as_deref().filter(|e| !e.is_empty()) {
                    b = b
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"));
                } else if std::env::var("AWS_ENDPOINT_URL")
                    .or_else(|_| std::env::var("AWS_ENDPOINT"))
                    .is_ok_and(|e| e.starts_with("http://"))
                {
                    b = b.with_allow_http(true);
                }
                (Arc::new(b.build()?), path_in_bucket(rest))
            }
            "gs" => {
                let b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url)
                    .with_client_options(client)
                    .with_retry(retry);
                (Arc::new(b.build()?), path_in_bucket(rest))
            }
            "az" | "abfs" => {
                let b = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .with_client_options(client)
                    .with_retry(retry);
                (Arc::new(b.build()?), path_in_bucket(rest))
            }
            "file" => {
                if !rest.starts_with('/') {
                    return Err(bad("a file:// URL needs an absolute path (file:///dir/)"));
                }
                std::fs::create_dir_all(rest).map_err(|e| bad(&e.to_string()))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(rest)?;
                (Arc::new(fs), "")
            }
            _ => return Err(bad("supported: s3://, gs://, az://, file://")),
        };
        Ok(Self {
            inner,
            root: ObjectPath::from(root.trim_matches('/')),
            url: url.to_string(),
            timeout: config.request_timeout,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, task: &str) -> ObjectPath {
        self.root.child(format!("{task}.{EXTENSION}"))
    }

    /// Bounds one whole operation (retries included), whatever the client's own timeouts do.
    async fn bounded<T>(
        &self,
        scale: u32,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let limit = self.timeout * scale;
        tokio::time::timeout(limit, f)
            .await
            .map_err(|_| StoreError::Timeout(limit))?
    }

    /// Every prefix object directly under the store's path (not in sub-folders).
    pub async fn list(&self) -> Result<Listing, StoreError> {
        let root = (!self.root.as_ref().is_empty()).then_some(&self.root);
        // A listing of 100,000 keys is 100 pages: give it time in proportion, still bounded.
        let result = self
            .bounded(30, async {
                Ok(self.inner.list_with_delimiter(root).await?)
            })
            .await?;
        let mut listing = Listing::default();
        for meta in result.objects {
            let Some(file) = meta.location.filename() else {
                continue;
            };
            let Some(task) = file.strip_suffix(&format!(".{EXTENSION}")) else {
                continue; // not a prefix file: left alone
            };
            if !valid_task_name(task) {
                listing.bad_names.push(meta.location.to_string());
                continue;
            }
            listing.tasks.push(Listed {
                task: task.to_string(),
                tag: tag_of(meta.e_tag.as_deref(), &meta),
                size: meta.size,
            });
        }
        Ok(listing)
    }

    /// The bytes of task `task`'s object and their tag. Reading stops at `max_bytes`, whatever
    /// the listing said: an object that grows between list and get is still refused.
    pub async fn get(&self, task: &str, max_bytes: u64) -> Result<(Bytes, String), StoreError> {
        let key = self.key(task);
        self.bounded(3, async {
            let got = self.inner.get(&key).await?;
            let too_large = |size| StoreError::TooLarge {
                key: key.to_string(),
                size,
                max: max_bytes,
            };
            if got.meta.size > max_bytes {
                return Err(too_large(got.meta.size));
            }
            let tag = tag_of(got.meta.e_tag.as_deref(), &got.meta);
            let mut body = Vec::with_capacity(got.meta.size as usize);
            let mut stream = got.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                if (body.len() + chunk.len()) as u64 > max_bytes {
                    return Err(too_large((body.len() + chunk.len()) as u64));
                }
                body.extend_from_slice(&chunk);
            }
            Ok((Bytes::from(body), tag))
        })
        .await
    }

    /// Writes task `task`'s object (atomically: readers see the old or the new). Returns its tag.
    pub async fn put(&self, task: &str, bytes: Bytes) -> Result<String, StoreError> {
        let key = self.key(task);
        self.bounded(3, async {
            let put = self.inner.put(&key, PutPayload::from(bytes)).await?;
            // A store that returns no ETag on PUT: ask for the object's metadata.
            let tag = match put.e_tag {
                Some(tag) => tag,
                None => {
                    let meta = self.inner.head(&key).await?;
                    tag_of(meta.e_tag.as_deref(), &meta)
                }
            };
            Ok(tag)
        })
        .await
    }

    /// Deletes task `task`'s object; deleting what is not there is not an error.
    pub async fn delete(&self, task: &str) -> Result<(), StoreError> {
        let key = self.key(task);
        self.bounded(3, async {
            match self.inner.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }
}

/// `AmazonS3Builder::from_env`, except that empty variables count as unset: a Kubernetes Secret
/// with an empty `AWS_ACCESS_KEY_ID` means "use the pod's identity", not "sign with an empty key".
fn s3_from_env() -> object_store::aws::AmazonS3Builder {
    let mut builder = object_store::aws::AmazonS3Builder::new();
    for (key, value) in std::env::vars() {
        if !key.starts_with("AWS_") || value.is_empty() {
            continue;
        }
        if let Ok(config) = key.to_ascii_lowercase().parse() {
            builder = builder.with_config(config, value);
        }
    }
    builder
}

/// `bucket/some/path/` → `some/path/`.
fn path_in_bucket(rest: &str) -> &str {
    rest.split_once('/').map_or("", |(_, path)| path)
}

fn tag_of(e_tag: Option<&str>, meta: &object_store::ObjectMeta) -> String {
    match e_tag {
        Some(tag) if !tag.is_empty() => tag.to_string(),
        _ => format!(
            "{}-{}",
            meta.last_modified.timestamp_nanos_opt().unwrap_or_default(),
            meta.size
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_recognised_and_bad_ones_named() {
        assert!(is_store_url("s3://bucket/prefixes/"));
        assert!(is_store_url("file:///srv/prefixes"));
        assert!(!is_store_url("prefixes"));
        assert!(!is_store_url("/srv/prefixes"));
        assert_eq!(path_in_bucket("bucket/a/b/"), "a/b/");
        assert_eq!(path_in_bucket("bucket"), "");
        let err = PrefixStore::open(&StoreConfig::new("ftp://x/y")).unwrap_err();
        assert!(err.to_string().contains("supported"), "{err}");
        let err = PrefixStore::open(&StoreConfig::new("file://relative/dir")).unwrap_err();
        assert!(err.to_string().contains("absolute"), "{err}");
    }

    #[test]
    fn a_file_store_lists_puts_gets_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/", dir.path().display());
        let store = PrefixStore::open(&StoreConfig::new(url)).unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        std::fs::write(dir.path().join("bad name.safetensors"), b"x").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let tag = store
                .put("a", Bytes::from_static(b"0123456789"))
                .await
                .unwrap();
            let listing = store.list().await.unwrap();
            assert_eq!(listing.tasks.len(), 1);
            assert_eq!(listing.tasks[0].task, "a");
            assert_eq!(listing.tasks[0].tag, tag);
            assert_eq!(listing.tasks[0].size, 10);
            assert_eq!(listing.bad_names.len(), 1);
            let (bytes, got_tag) = store.get("a", 10).await.unwrap();
            assert_eq!((&bytes[..], got_tag), (&b"0123456789"[..], tag));
            let err = store.get("a", 9).await.unwrap_err();
            assert!(
                matches!(err, StoreError::TooLarge { size: 10, .. }),
                "{err}"
            );
            store.delete("a").await.unwrap();
            store.delete("a").await.unwrap();
            assert!(store.list().await.unwrap().tasks.is_empty());
        });
    }
}
