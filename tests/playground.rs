//! The playground page (`/`) and the API docs (`/docs`), in a real headless Chromium driven
//! through chromedriver (installed by `scripts/browser-env`, which `scripts/test` runs): list the
//! tasks, type a text, classify, read the rendered top label; a screenshot is kept in
//! `target/test-artifacts/`. Real model and a shipped prefix.

mod common;

use common::server::Server;
use fantoccini::{ClientBuilder, Locator};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn which(name: &str, var: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin").join(name));
    assert!(
        path.exists(),
        "{} is missing: run scripts/browser-env (scripts/test does) or set {var}",
        path.display()
    );
    path
}

/// chromedriver on a free port, killed on drop.
struct Driver(Child, u16);

impl Driver {
    /// With `--port=0` chromedriver binds a free port itself and prints it. (Picking a free port
    /// here and passing it on leaves a window in which another process can take it, and a
    /// connect that succeeds may then reach that process.)
    fn start() -> Self {
        let mut child = Command::new(which("chromedriver", "PREFIXD_CHROMEDRIVER"))
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the port, then drains the rest so chromedriver never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line
                    .split("started successfully on port ")
                    .nth(1)
                    .and_then(|rest| rest.trim_end_matches('.').parse::<u16>().ok())
                {
                    let _ = tx.send(port);
                }
            }
        });
        let port = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(port) => port,
            Err(_) => {
                let _ = child.kill();
                panic!("chromedriver did not say which port it listens on within 20 s");
            }
        };
        Self(child, port)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn artifacts() -> PathBuf {
    let dir = common::repo_root().join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_playground_classifies_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    for task in ["sst2", "trec"] {
        let name = format!("{task}.safetensors");
        std::fs::copy(
            common::repo_root().join("prefixes").join(&name),
            dir.path().join(&name),
        )
        .unwrap();
    }
    let server = Server::start(dir.path(), &[]);
    let text = "A wonderful, moving film with a superb cast.";
    let expected = server.classify(&json!({"task": "sst2", "inputs": [text]}));
    assert_eq!(expected.status, 200, "{}", expected.text);
    let expected = expected.body["results"][0]["label"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(expected, "positive");

    let driver = Driver::start();
    let chromium = which("chromium", "PREFIXD_CHROMIUM");
    let caps = json!({"goog:chromeOptions": {
        "binary": chromium,
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,900"],
    }});
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.as_object().unwrap().clone())
            .connect(&format!("http://127.0.0.1:{}", driver.1))
            .await
            .expect("a WebDriver session");
        let result = async {
            client.goto(&format!("{}/", server.base)).await?;
            // The task list comes from /v1/tasks.
            client
                .wait()
                .at_most(Duration::from_secs(20))
                .for_element(Locator::Css("#task option[value='trec']"))
                .await?;
            client
                .find(Locator::Css("#task"))
                .await?
                .select_by_value("sst2")
                .await?;
            client
                .find(Locator::Id("text"))
                .await?
                .send_keys(text)
                .await?;
            let curl = client.find(Locator::Id("curl")).await?.text().await?;
            client.find(Locator::Id("run")).await?.click().await?;
            client
                .wait()
                .at_most(Duration::from_secs(20))
                .for_element(Locator::Css("#results .row.top"))
                .await?;
            let top = client.find(Locator::Id("top-label")).await?.text().await?;
            let rows = client.find_all(Locator::Css("#results .row")).await?.len();
            let shot = client.screenshot().await?;
            std::fs::write(artifacts().join("playground.png"), &shot).unwrap();

            client.goto(&format!("{}/docs/", server.base)).await?;
            let op = client
                .wait()
                .at_most(Duration::from_secs(20))
                .for_element(Locator::Css(
                    ".opblock-summary-path[data-path='/v1/classify']",
                ))
                .await?;
            let docs_path = op.text().await?;
            std::fs::write(artifacts().join("docs.png"), client.screenshot().await?).unwrap();
            Ok::<_, fantoccini::error::CmdError>((top, rows, curl, shot.len(), docs_path))
        }
        .await;
        let _ = client.close().await;
        let (top, rows, curl, shot, docs_path) = result.expect("the page works");
        assert_eq!(top, expected, "the rendered top label is the server's");
        assert_eq!(rows, 2, "one bar per sst2 label");
        assert!(
            curl.contains("/v1/classify") && curl.contains("moving film"),
            "{curl}"
        );
        assert!(shot > 1000, "a screenshot was taken");
        assert_eq!(docs_path.replace('\u{200b}', ""), "/v1/classify");
    });
}

/// Without a browser: the pages are served from the binary, with no outside resources.
#[test]
fn the_pages_are_served_offline() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_tiny(dir.path(), &[]);
    let page = server.get("/");
    assert_eq!(page.status, 200);
    assert!(page.text.contains("prefixd playground") && page.text.contains("v1/classify"));
    assert!(
        !page.text.contains("https://"),
        "the playground loads nothing from the network"
    );
    let docs = server.get("/docs/");
    assert_eq!(docs.status, 200);
    assert!(
        !docs.text.contains("https://"),
        "Swagger UI is vendored: {}",
        docs.text
    );
    assert_eq!(server.get("/openapi.json").body["info"]["title"], "prefixd");
}
