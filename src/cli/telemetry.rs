//! Where logs and traces go: log lines to stderr (text or JSON) under `RUST_LOG`, and, with
//! `--otlp-endpoint`, the request spans (`request` › `tokenize`, `queue`, `forward`) to an
//! OpenTelemetry collector over OTLP/HTTP. The spans are DEBUG-level, so the log filter does not
//! hide them from the exporter: each output has its own filter.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{filter, EnvFilter, Layer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Keeps the trace exporter alive; dropping it flushes the spans still buffered.
#[derive(Default)]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("warning: flushing traces to the OTLP collector failed: {e}");
            }
        }
    }
}

pub fn init_tracing(verbose: u8, format: LogFormat, otlp_endpoint: Option<&str>) -> Telemetry {
    let default = match verbose {
        0 => "warn,prefixd=info",
        1 => "info,prefixd=debug",
        _ => "debug,prefixd=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr is a file on a full disk) is lost, not a
        // panic: by default the subscriber reports its own write errors with `eprintln!`, which
        // panics when stderr is unwritable and drops the request being served.
        .log_internal_errors(false);
    let logs = match format {
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_filter(filter)
            .boxed(),
    };
    let mut telemetry = Telemetry::default();
    let traces = otlp_endpoint
        .filter(|e| !e.trim().is_empty())
        .and_then(|endpoint| match tracer_provider(endpoint) {
            Ok(provider) => {
                use opentelemetry::trace::TracerProvider;
                let tracer = provider.tracer("prefixd");
                telemetry.provider = Some(provider);
                let spans = filter::Targets::new().with_target("prefixd", tracing::Level::DEBUG);
                Some(
                    tracing_opentelemetry::layer()
                        .with_tracer(tracer)
                        .with_filter(spans),
                )
            }
            Err(e) => {
                eprintln!("warning: traces off: cannot export to {endpoint}: {e}");
                None
            }
        });
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init();
    telemetry
}

fn tracer_provider(endpoint: &str) -> anyhow::Result<opentelemetry_sdk::trace::SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    // The collector's base address, as OTEL_EXPORTER_OTLP_ENDPOINT gives it; traces go to its
    // /v1/traces.
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .with_timeout(std::time::Duration::from_secs(5))
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("prefixd")
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}
