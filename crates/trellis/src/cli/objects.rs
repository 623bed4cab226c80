//! `trellis apply|delete|get`: Services and EndpointSlices from manifests as `kubectl`
//! takes them (YAML with `---` between documents, or JSON; `kind: List` too), into and out
//! of the store. Parsing text into documents is done here; everything after that is in
//! `trellis_model::object` and `trellis_agent::ctl::objects`.

use super::state::StoreArgs;
use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde::Deserialize;
use serde_json::{Value, json};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use trellis_agent::ctl::CtlError;
use trellis_agent::ctl::objects::{self, ObjectRef};
use trellis_model::{DEFAULT_NAMESPACE, Document, Kind, Object};

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// A manifest: YAML (documents separated by `---`) or JSON, one object or a `kind: List`;
    /// `-` reads standard input. May be given several times; all are written together.
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// Delete the objects a manifest names (as for apply).
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        conflicts_with = "kind"
    )]
    pub files: Vec<PathBuf>,
    /// What to delete: service (svc) or endpointslice.
    #[arg(required_unless_present = "files")]
    pub kind: Option<String>,
    /// The names of the objects.
    #[arg(requires = "kind")]
    pub names: Vec<String>,
    #[arg(short = 'n', long, default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Succeed when an object does not exist.
    #[arg(long)]
    pub ignore_not_found: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// What to list: services (svc) or endpointslices.
    pub kind: String,
    /// One object by name.
    pub name: Option<String>,
    /// The namespace (default: `default`).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    /// The objects as JSON or YAML (applyable as they are), or a wider table.
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<Format>,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Json,
    Yaml,
    Wide,
}

fn kind(name: &str) -> anyhow::Result<Kind> {
    Kind::from_resource(name).with_context(|| {
        format!("unknown resource type {name:?}: trellis stores services (svc) and endpointslices")
    })
}

pub async fn apply(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    let docs = read_manifests(&args.files)?;
    let store = args.store.open()?;
    let objects = docs.iter().map(|d| d.object.clone()).collect();
    let applied = objects::apply(store.as_ref(), objects)
        .await
        .map_err(|e| name_document(e, &docs))?;
    for a in applied {
        println!("{a}");
    }
    Ok(ExitCode::SUCCESS)
}

/// A refusal of one object, named by the document it came from.
fn name_document(e: CtlError, docs: &[Document]) -> anyhow::Error {
    match e {
        CtlError::InvalidObject {
            index,
            object,
            error,
        } => anyhow::anyhow!(error.within(format!("{} ({object})", docs[index].origin))),
        other => other.into(),
    }
}

pub async fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let refs: Vec<ObjectRef> = match &args.kind {
        Some(name) => {
            let kind = kind(name)?;
            if args.names.is_empty() {
                bail!("name which {} to delete", kind.resource());
            }
            args.names
                .iter()
                .map(|name| ObjectRef {
                    kind,
                    namespace: args.namespace.clone(),
                    name: name.clone(),
                })
                .collect()
        }
        None => read_manifests(&args.files)?
            .iter()
            .map(|d| ObjectRef::of(&d.object))
            .collect(),
    };
    let store = args.store.open()?;
    let mut code = ExitCode::SUCCESS;
    for (r, deleted) in objects::delete(store.as_ref(), &refs).await? {
        if deleted {
            println!("{} \"{}\" deleted", r.kind.resource(), r.name);
        } else if !args.ignore_not_found && !r.kind.is_namespaced() {
            eprintln!("error: {} \"{}\" not found", r.kind.resource(), r.name);
            code = ExitCode::FAILURE;
        } else if !args.ignore_not_found {
            eprintln!(
                "error: {} \"{}\" not found in namespace {}",
                r.kind.resource(),
                r.name,
                r.namespace
            );
            code = ExitCode::FAILURE;
        }
    }
    Ok(code)
}

pub async fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    let kind = kind(&args.kind)?;
    if args.all_namespaces && args.name.is_some() {
        bail!("an object cannot be named across all namespaces: give -n NAMESPACE instead of -A");
    }
    let namespace = match (&args.namespace, args.all_namespaces) {
        _ if !kind.is_namespaced() => None,
        (_, true) => None,
        (Some(ns), false) => Some(ns.as_str()),
        (None, false) => Some(DEFAULT_NAMESPACE),
    };
    let store = args.store.open()?;
    let listing = objects::get(store.as_ref(), kind, namespace, args.name.as_deref()).await?;
    for bad in &listing.invalid {
        eprintln!("warning: skipping an invalid record: {bad}");
    }
    match args.output {
        Some(format @ (Format::Json | Format::Yaml)) => {
            let value = match (&args.name, listing.objects.as_slice()) {
                (Some(_), [one]) => one.to_value(),
                _ => json!({
                    "apiVersion": "v1",
                    "kind": "List",
                    "items": listing.objects.iter().map(Object::to_value).collect::<Vec<_>>(),
                    "metadata": {"resourceVersion": ""},
                }),
            };
            if format == Format::Json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", serde_yaml_ng::to_string(&value)?);
            }
        }
        wide => {
            if listing.objects.is_empty() {
                match namespace {
                    Some(ns) => eprintln!("No resources found in {ns} namespace."),
                    None => eprintln!("No resources found"),
                }
            } else {
                let wide = wide == Some(Format::Wide);
                print!(
                    "{}",
                    objects::table(&listing.objects, kind, namespace.is_none(), wide)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Every object of every file, decoded and validated, each with where it came from.
fn read_manifests(files: &[PathBuf]) -> anyhow::Result<Vec<Document>> {
    let mut docs = Vec::new();
    for file in files {
        let (source, text) = if file == Path::new("-") {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading standard input")?;
            ("stdin".to_string(), text)
        } else {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            (file.display().to_string(), text)
        };
        docs.extend(split_documents(&source, &text)?);
    }
    Ok(trellis_model::object::documents(docs)?)
}

/// The documents of one text, as `kubectl` reads it: a JSON stream when it starts with
/// `{`, else YAML documents separated by `---`.
fn split_documents(source: &str, text: &str) -> anyhow::Result<Vec<(String, Value)>> {
    let origin = |i: usize| format!("{source}, document {}", i + 1);
    let mut docs = Vec::new();
    if text.trim_start().starts_with('{') {
        for (i, value) in serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .enumerate()
        {
            docs.push((
                origin(i),
                value.with_context(|| format!("{}: not JSON", origin(i)))?,
            ));
        }
    } else {
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let value =
                Value::deserialize(doc).with_context(|| format!("{}: not YAML", origin(i)))?;
            docs.push((origin(i), value));
        }
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_documents_json_streams_and_empty_documents() {
        let yaml =
            "apiVersion: v1\nkind: Service\n---\n---\n# only a comment\nkind: List\nitems: []\n";
        let docs = split_documents("x.yaml", yaml).unwrap();
        let kinds: Vec<(&str, Option<&str>)> = docs
            .iter()
            .map(|(o, v)| (o.as_str(), v.get("kind").and_then(Value::as_str)))
            .collect();
        assert_eq!(
            kinds,
            [
                ("x.yaml, document 1", Some("Service")),
                ("x.yaml, document 2", None),
                ("x.yaml, document 3", Some("List"))
            ]
        );
        let json = r#"{"kind": "Service"} {"kind": "EndpointSlice"}"#;
        assert_eq!(split_documents("-", json).unwrap().len(), 2);
        let bad = split_documents("x.yaml", "a: [\n").unwrap_err();
        assert!(
            format!("{bad:#}").contains("x.yaml, document 1: not YAML"),
            "{bad:#}"
        );
    }

    #[test]
    fn yaml_keeps_port_names_apart_from_numbers() {
        let (_, v) = split_documents("x", "targetPort: \"8080\"\nport: 80\n")
            .unwrap()
            .remove(0);
        assert_eq!(v, json!({"targetPort": "8080", "port": 80}));
    }
}
