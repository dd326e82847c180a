//! The Kubernetes manifests (`deploy/k8s`, a kustomize base), rendered with `kubectl kustomize`
//! as CI renders them, and checked for what makes them work: probes on the right routes and
//! port, a grace period that covers preStop + drain delay + shutdown timeout, every setting a
//! variable `prefixd serve` reads, selectors that match, scrape annotations on the served port.

use serde_yaml::Value;
use std::path::Path;
use std::process::Command;

fn render() -> Vec<Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(root.join("deploy/k8s"))
        .output()
        .expect("kubectl is installed (it renders the manifests)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

use serde::Deserialize;

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

fn int(v: &Value) -> i64 {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not a number: {v:?}"))
}

#[test]
fn the_manifests_wire_up() {
    let docs = render();
    let deploy = one(&docs, "Deployment");
    let config = one(&docs, "ConfigMap");
    let secret = one(&docs, "Secret");
    let pod = &deploy["spec"]["template"];
    let c = &pod["spec"]["containers"][0];
    let env = &config["data"];

    // The served port, the probes and the scrape annotations agree.
    let port = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "http")
        .expect("an http port");
    let port = int(&port["containerPort"]);
    let addr = env["PREFIXD_ADDR"].as_str().unwrap();
    assert_eq!(
        addr.rsplit(':').next().unwrap().parse::<i64>().unwrap(),
        port,
        "the server listens on the container port"
    );
    assert!(
        addr.starts_with("0.0.0.0:"),
        "reachable from outside the pod"
    );
    for (probe, path) in [
        ("startupProbe", "/ready"),
        ("readinessProbe", "/ready"),
        ("livenessProbe", "/health"),
    ] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "http", "{probe}");
    }
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(int(&annotations["prometheus.io/port"]), port);
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    // The drain: preStop, then /ready 503 while still serving, then in-flight work finishes;
    // the grace period covers all three.
    let pre_stop = int(&c["lifecycle"]["preStop"]["sleep"]["seconds"]);
    let drain = int(&env["PREFIXD_DRAIN_DELAY"]);
    let shutdown = int(&env["PREFIXD_SHUTDOWN_TIMEOUT"]);
    let grace = int(&pod["spec"]["terminationGracePeriodSeconds"]);
    assert!(drain > 0, "readiness fails before the listener closes");
    assert!(
        grace >= pre_stop + drain + shutdown + 5,
        "grace {grace} < {pre_stop} + {drain} + {shutdown} + 5"
    );
    // Readiness must notice within the drain delay.
    let ready = &c["readinessProbe"];
    assert!(int(&ready["periodSeconds"]) * int(&ready["failureThreshold"]) <= drain);

    // Every variable comes from objects that exist and is one `prefixd serve` reads.
    let sources: Vec<(&str, &str)> = c["envFrom"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(
            |s| match (&s["configMapRef"]["name"], &s["secretRef"]["name"]) {
                (Value::String(n), _) => ("ConfigMap", n.as_str()),
                (_, Value::String(n)) => ("Secret", n.as_str()),
                _ => panic!("unexpected envFrom {s:?}"),
            },
        )
        .collect();
    assert!(sources.contains(&("ConfigMap", config["metadata"]["name"].as_str().unwrap())));
    assert!(sources.contains(&("Secret", secret["metadata"]["name"].as_str().unwrap())));
    let help = Command::new(env!("CARGO_BIN_EXE_prefixd"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let keys = env
        .as_mapping()
        .unwrap()
        .keys()
        .chain(secret["stringData"].as_mapping().unwrap().keys());
    for key in keys {
        let key = key.as_str().unwrap();
        // AWS_* are the standard variables the S3 client reads (named in --prefixes' help).
        assert!(
            help.contains(&format!("[env: {key}"))
                || (key.starts_with("AWS_") && help.contains("AWS_* variables")),
            "prefixd serve reads no {key}"
        );
    }

    // The replicas share one store, cached on a volume that is mounted and writable.
    let url = env["PREFIXD_PREFIXES"].as_str().unwrap();
    assert!(url.starts_with("s3://"), "{url}");
    prefixd::serving::registry::PrefixStore::open(&prefixd::serving::StoreConfig::new(url))
        .expect("the store URL parses");
    let cache = env["PREFIXD_PREFIX_CACHE"].as_str().unwrap();
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == cache)
        .expect("the prefix cache is a mounted volume");
    assert!(mount["readOnly"].is_null() || mount["readOnly"] == false);
    let volumes = pod["spec"]["volumes"].as_sequence().unwrap();
    assert!(volumes.iter().any(|v| v["name"] == mount["name"]));
    for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        assert!(
            env[k].is_null(),
            "{k} belongs in the Secret, not the ConfigMap"
        );
        assert!(secret["stringData"][k].is_string(), "{k} in the Secret");
    }
    assert_eq!(
        secret["stringData"]["PREFIXD_ADMIN_TOKEN"], "",
        "no default admin token is shipped"
    );

    // Resources, and selectors that select this pod.
    for k in ["cpu", "memory"] {
        assert!(!c["resources"]["requests"][k].is_null(), "requests.{k}");
    }
    assert!(!c["resources"]["limits"]["memory"].is_null());
    let labels = pod["metadata"]["labels"].as_mapping().unwrap();
    let selects = |sel: &Value| {
        sel.as_mapping()
            .unwrap()
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    };
    assert!(selects(&deploy["spec"]["selector"]["matchLabels"]));
    assert!(selects(&one(&docs, "Service")["spec"]["selector"]));
    assert!(selects(
        &one(&docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    ));
    assert_eq!(
        one(&docs, "Service")["spec"]["ports"][0]["targetPort"],
        "http"
    );
    let hpa = one(&docs, "HorizontalPodAutoscaler");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deploy["metadata"]["name"]
    );
    assert!(
        int(&hpa["spec"]["minReplicas"]) >= 2,
        "a PDB with one replica would block every drain"
    );
}
