//! `--otlp-endpoint`: each request becomes a trace in an OpenTelemetry collector — a `request`
//! span with `tokenize`, `queue` and `forward` inside it — exported over OTLP/HTTP (protobuf).
//! The collector here is a stand-in on 127.0.0.1 that decodes what arrives. Tiny model.

mod common;

use bytes::Bytes;
use common::server::Server;
use common::tiny;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn collector() -> (String, Arc<Mutex<Vec<Span>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .map(|a| format!("{:?}", a.value));
                    assert!(service.unwrap_or_default().contains("prefixd"));
                    for ss in rs.scope_spans {
                        sink.lock().unwrap().extend(ss.spans);
                    }
                }
                ""
            }
        }),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                axum::serve(tokio::net::TcpListener::from_std(listener).unwrap(), app)
                    .await
                    .unwrap();
            })
    });
    (url, spans)
}

#[test]
fn requests_become_traces_with_tokenize_queue_and_forward() {
    let (url, spans) = collector();
    let dir = tempfile::tempdir().unwrap();
    tiny::seed_prefix(dir.path(), "alpha", 4, 2);
    let server = Server::start_tiny(dir.path(), &["--otlp-endpoint", &url]);
    for text in ["a b", "c d e"] {
        let r = server.classify(&json!({"task": "alpha", "inputs": [text, "f"]}));
        assert_eq!(r.status, 200, "{}", r.text);
    }
    server.sigterm(); // the exporter flushes at exit
    assert!(server.wait(Duration::from_secs(30)).success());

    let spans = spans.lock().unwrap();
    let requests: Vec<&Span> = spans
        .iter()
        .filter(|s| {
            s.name == "request"
                && s.attributes
                    .iter()
                    .any(|a| format!("{:?}", a.value).contains("/v1/classify"))
        })
        .collect();
    assert_eq!(
        requests.len(),
        2,
        "one trace per classify request: {:?}",
        names(&spans)
    );
    for request in requests {
        let children: Vec<&str> = spans
            .iter()
            .filter(|s| s.trace_id == request.trace_id && s.parent_span_id == request.span_id)
            .map(|s| s.name.as_str())
            .collect();
        for inner in ["tokenize", "queue", "forward"] {
            assert!(
                children.contains(&inner),
                "{inner} missing under the request: {children:?}"
            );
        }
        for s in spans.iter().filter(|s| s.trace_id == request.trace_id) {
            assert!(
                s.start_time_unix_nano >= request.start_time_unix_nano
                    && s.end_time_unix_nano <= request.end_time_unix_nano,
                "{} lies inside its request",
                s.name
            );
        }
    }
}

fn names(spans: &[Span]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}
