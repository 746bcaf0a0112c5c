//! `deploy/k8s/`: the worker pools, the coordinator and its policies as Kubernetes
//! manifests. No cluster runs here (no images, no registry, no Kubernetes packages), so
//! what can be checked is checked: every object parses into its Kubernetes API type
//! (k8s-openapi) with no field lost on the way (a misspelt field would be dropped), the
//! objects as parsed match `deploy/k8s/golden.json`, the pieces fit together (secret
//! keys, service, selectors, policies), and a real worker started with the CPU pool's
//! own arguments takes `scheduler: k8s` steps and only those.

mod common;

use common::mesh::{Coord, Worker, remote, remote_status, step};
use common::{Project, text};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, PodSpec, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s")
}

/// YAML (as yaml-rust2 reads it) to JSON.
fn json_of(y: &yaml_rust2::Yaml) -> Value {
    use yaml_rust2::Yaml;
    match y {
        Yaml::Real(r) => r.parse::<f64>().map_or(Value::Null, Value::from),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::String(s) => Value::from(s.clone()),
        Yaml::Boolean(b) => Value::from(*b),
        Yaml::Array(a) => Value::Array(a.iter().map(json_of).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), json_of(v)))
                .collect(),
        ),
        _ => Value::Null,
    }
}

/// Every object of every manifest, in file order: (file, kind, name, JSON).
fn objects() -> Vec<(String, String, String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .expect("deploy/k8s")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        let docs = yaml_rust2::YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for d in docs {
            let v = json_of(&d);
            let kind = v["kind"].as_str().unwrap_or_default().to_string();
            let name = v["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let file = f
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            out.push((file, kind, name, v));
        }
    }
    out
}

/// Parses `v` as `T` and back: the JSON must come back the same (nothing unknown).
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(what: &str, v: &Value) -> (T, Value) {
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let back = serde_json::to_value(&t).expect("serialize");
    if let Err(path) = kept(v, &back, String::new()) {
        panic!(
            "{what}: {path} was lost or changed by the Kubernetes types (a misspelt or misplaced field?)"
        );
    }
    (t, back)
}

/// Whether everything in `orig` is in `back`, unchanged (`back` may add what the types
/// always write, such as a claim template's apiVersion); the first path that is not.
fn kept(orig: &Value, back: &Value, path: String) -> Result<(), String> {
    match (orig, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (k, v) in o {
                let here = format!("{path}.{k}");
                kept(v, b.get(k).ok_or_else(|| here.clone())?, here)?;
            }
            Ok(())
        }
        (Value::Array(o), Value::Array(b)) if o.len() == b.len() => {
            for (i, (x, y)) in o.iter().zip(b).enumerate() {
                kept(x, y, format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        _ if orig == back => Ok(()),
        _ => Err(path),
    }
}

fn pod_spec<'a>(what: &str, spec: Option<&'a PodSpec>) -> &'a PodSpec {
    spec.unwrap_or_else(|| panic!("{what}: no pod spec"))
}

#[test]
fn the_manifests_parse_into_the_kubernetes_types_match_their_golden_file_and_fit_together() {
    let objs = objects();
    let mut parsed = Vec::new();
    let (mut deployments, mut secrets, mut services, mut sets, mut policies) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (file, kind, name, v) in &objs {
        let what = format!("{file}: {kind} {name}");
        assert_eq!(
            v["metadata"]["namespace"].as_str().unwrap_or("nexa"),
            "nexa",
            "{what}: in the nexa namespace"
        );
        let back = match kind.as_str() {
            "Namespace" => typed::<Namespace>(&what, v).1,
            "Secret" => {
                let (s, b) = typed::<Secret>(&what, v);
                secrets.push(s);
                b
            }
            "Service" => {
                let (s, b) = typed::<Service>(&what, v);
                services.push(s);
                b
            }
            "StatefulSet" => {
                let (s, b) = typed::<StatefulSet>(&what, v);
                sets.push(s);
                b
            }
            "Deployment" => {
                let (d, b) = typed::<Deployment>(&what, v);
                deployments.push(d);
                b
            }
            "NetworkPolicy" => {
                let (p, b) = typed::<NetworkPolicy>(&what, v);
                policies.push(p);
                b
            }
            other => panic!("{what}: a kind this test does not know: {other}"),
        };
        parsed.push(serde_json::json!({"file": file, "object": back}));
    }

    // The golden file: the objects as the Kubernetes types read them. A change to the
    // manifests changes it; NEXA_BLESS=1 writes it anew, to be reviewed in the diff.
    let golden = dir().join("golden.json");
    let now = serde_json::to_string_pretty(&parsed).expect("json") + "\n";
    if std::env::var_os("NEXA_BLESS").is_some() {
        std::fs::write(&golden, &now).expect("bless");
    }
    let want = std::fs::read_to_string(&golden).unwrap_or_default();
    assert!(
        want == now,
        "deploy/k8s changed: the objects no longer match deploy/k8s/golden.json \
         (NEXA_BLESS=1 cargo test --test k8s writes it; review the diff)"
    );

    // The pieces fit together.
    let secret = secrets.first().expect("a Secret");
    let secret_name = secret.metadata.name.clone().unwrap_or_default();
    let keys: Vec<String> = secret
        .string_data
        .as_ref()
        .map(|d| d.keys().cloned().collect())
        .unwrap_or_default();
    let env_refs = |spec: &PodSpec| -> Vec<(String, String, String)> {
        spec.containers
            .iter()
            .flat_map(|c| c.env.iter().flatten())
            .filter_map(|e| {
                let r = e.value_from.as_ref()?.secret_key_ref.as_ref()?;
                Some((e.name.clone(), r.name.clone(), r.key.clone()))
            })
            .collect()
    };
    let set = sets.first().expect("the coordinator's StatefulSet");
    let set_spec = set.spec.as_ref().expect("spec");
    assert!(
        set_spec
            .volume_claim_templates
            .as_ref()
            .is_some_and(|v| !v.is_empty()),
        "the coordinator keeps its data on a volume"
    );
    assert_eq!(set_spec.replicas, Some(1), "one coordinator owns the store");
    let coord_pod = pod_spec("coordinator", set_spec.template.spec.as_ref());
    let coord_labels = set_spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (var, name, key) in env_refs(coord_pod) {
        assert!(
            name == secret_name && keys.contains(&key),
            "{var}: {name}/{key}"
        );
    }
    let service = services
        .iter()
        .find(|s| {
            s.metadata.name.as_deref() == Some(set_spec.service_name.as_deref().unwrap_or(""))
        })
        .expect("the StatefulSet's Service");
    let selector = service
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    assert!(
        !selector.is_empty() && selector.iter().all(|(k, v)| coord_labels.get(k) == Some(v)),
        "the Service selects the coordinator's pods"
    );
    let grpc_port = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.iter().find(|p| p.name.as_deref() == Some("grpc")))
        .map(|p| p.port)
        .expect("a grpc port");
    let url = format!(
        "http://{}:{grpc_port}",
        service.metadata.name.clone().unwrap_or_default()
    );

    assert_eq!(deployments.len(), 2, "a CPU pool and a GPU pool");
    let mut gpu_pools = 0;
    for d in &deployments {
        let name = d.metadata.name.clone().unwrap_or_default();
        let spec = d.spec.as_ref().expect("spec");
        let pod = pod_spec(&name, spec.template.spec.as_ref());
        let c = &pod.containers[0];
        let args = c.args.clone().unwrap_or_default();
        assert_eq!(args.first().map(String::as_str), Some("join"), "{name}");
        assert_eq!(
            args.get(1),
            Some(&url),
            "{name} joins the coordinator's Service"
        );
        assert!(
            args.windows(2)
                .any(|w| w[0] == "--label" && w[1] == "scheduler=k8s"),
            "{name} is reserved for scheduler: k8s steps"
        );
        for (var, sname, key) in env_refs(pod) {
            assert!(sname == secret_name && keys.contains(&key), "{name}: {var}");
        }
        let pod_labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let select = spec.selector.match_labels.clone().unwrap_or_default();
        assert!(
            select.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
            "{name}: selector"
        );
        let gpus = c
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("nvidia.com/gpu"))
            .map(|q| q.0.clone());
        if let Some(n) = gpus {
            gpu_pools += 1;
            assert_eq!(n, "1", "{name}");
            assert_eq!(pod.runtime_class_name.as_deref(), Some("nvidia"), "{name}");
        } else {
            assert!(
                args.windows(2).any(|w| w == ["--gpus", "none"]),
                "{name}: a CPU pool offers no GPU"
            );
        }
        // The network policies let this pool reach the coordinator.
        let reaches = policies.iter().any(|p| {
            let ps = p.spec.as_ref();
            let applies = ps
                .and_then(|s| s.pod_selector.as_ref())
                .and_then(|s| s.match_labels.as_ref())
                .is_some_and(|m| m.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
            applies
                && ps.and_then(|s| s.egress.as_ref()).is_some_and(|e| {
                    e.iter().any(|r| {
                        r.ports.iter().flatten().any(|p| {
                            p.port
                                == Some(
                                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(
                                        grpc_port,
                                    ),
                                )
                        })
                    })
                })
        });
        assert!(
            reaches,
            "{name}: a NetworkPolicy lets it reach the coordinator"
        );
    }
    assert_eq!(gpu_pools, 1, "one GPU pool");
    let ingress = policies
        .iter()
        .find(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.pod_selector.as_ref())
                .and_then(|s| s.match_labels.as_ref())
                .is_some_and(|m| m.iter().all(|(k, v)| coord_labels.get(k) == Some(v)))
        })
        .expect("a NetworkPolicy for the coordinator");
    assert!(
        ingress
            .spec
            .as_ref()
            .and_then(|s| s.ingress.as_ref())
            .is_some_and(|i| !i.is_empty()),
        "the coordinator takes traffic only as its policy says"
    );
}

#[test]
fn a_worker_started_with_the_cpu_pools_own_arguments_takes_k8s_steps_and_only_those() {
    let objs = objects();
    let (_, _, _, cpu) = objs
        .iter()
        .find(|(_, k, n, _)| k == "Deployment" && n == "nexa-worker-cpu")
        .expect("the CPU pool");
    let d: Deployment = serde_json::from_value(cpu.clone()).expect("Deployment");
    let args = d
        .spec
        .and_then(|s| s.template.spec)
        .map(|p| p.containers[0].args.clone().unwrap_or_default())
        .unwrap_or_default();
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let pod = p.path().join("pod");
    // The pod's arguments, with this test's coordinator and directories.
    let mine: Vec<String> = args
        .iter()
        .skip(2)
        .map(|a| a.replace("/var/lib/nexa-worker", &pod.display().to_string()))
        .collect();
    let mut all = vec!["--name", "pod-0"];
    all.extend(mine.iter().map(String::as_str));
    let _pool = Worker::start_raw(&url, &pod, &all);
    let _ordinary = Worker::start(&url, &p.path().join("ordinary"), 1, None, &[]);
    common::mesh::wait_workers(&p, &coord, 2);
    p.write(
        "mixed.yaml",
        r#"
pipeline:
  name: mixed
  steps:
    - id: local
      uses: exec
      params: {run: 'echo local > "$NEXA_OUT/who"'}
      out: artifacts/local
    - id: pooled
      uses: exec
      scheduler: k8s
      params: {run: 'echo pooled > "$NEXA_OUT/who"'}
      out: artifacts/pooled
"#,
    );
    let out = remote(&p, &coord, &["pipeline", "run", "mixed.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let status = remote_status(&p, &coord, "mixed.yaml");
    assert_eq!(step(&status, "pooled")["status"], "COMPLETE");
    let workers = coord.workers(&p);
    let name_of = |id: &Value| {
        workers
            .iter()
            .find(|w| w["id"] == *id || w["public_key"] == *id)
            .map(|w| w["name"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        name_of(&step(&status, "pooled")["worker"]),
        "pod-0",
        "{status}"
    );
    assert_ne!(
        name_of(&step(&status, "local")["worker"]),
        "pod-0",
        "{status}"
    );
}
