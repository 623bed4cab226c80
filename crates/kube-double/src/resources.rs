//! The resources the double serves: a static table of built-in kinds, extended at run time
//! by every `CustomResourceDefinition` created (its group, served versions, scope, names,
//! `status` subresource and `additionalPrinterColumns`).

use serde_json::Value;

/// Where a table column's cells come from.
#[derive(Debug, Clone, PartialEq)]
pub enum CellSource {
    /// A JSONPath subset: `.spec.x`, `.status.x.y`, `.a[0].b`.
    Path(String),
    /// A node's `Ready` condition as `Ready`/`NotReady`/`Unknown`.
    NodeStatus,
    /// `node-role.kubernetes.io/*` labels, or `<none>`.
    NodeRoles,
    /// A service's ports as `80/TCP,53/UDP`.
    ServicePorts,
    /// An EndpointSlice's ports as `80,443`.
    SlicePorts,
    /// An EndpointSlice's endpoint addresses, comma separated.
    SliceEndpoints,
}

/// One column of `kubectl get` (a `TableColumnDefinition`).
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    /// `string`, `integer`, `number`, `boolean` or `date` (cells rendered as an age).
    pub kind: String,
    pub description: String,
    pub priority: i64,
    pub source: CellSource,
}

impl Column {
    fn path(name: &str, kind: &str, path: &str) -> Self {
        Self::computed(name, kind, CellSource::Path(path.to_string()))
    }

    fn computed(name: &str, kind: &str, source: CellSource) -> Self {
        Column {
            name: name.into(),
            kind: kind.into(),
            description: String::new(),
            priority: 0,
            source,
        }
    }

    fn age() -> Self {
        Self::path("Age", "date", ".metadata.creationTimestamp")
    }
}

/// One served group/version/resource.
#[derive(Debug, Clone)]
pub struct ResourceDef {
    /// Empty for the core group.
    pub group: String,
    pub version: String,
    /// The plural resource name in URLs: `nodes`.
    pub resource: String,
    pub singular: String,
    pub kind: String,
    pub list_kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub status_subresource: bool,
    /// Defined by a CRD (strategic merge patch is refused, status dropped on create).
    pub custom: bool,
    /// Columns after NAME (which every table has).
    pub columns: Vec<Column>,
}

impl ResourceDef {
    /// `v1` or `coordination.k8s.io/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

fn builtin(
    group: &str,
    version: &str,
    resource: &str,
    kind: &str,
    namespaced: bool,
    short: &[&str],
) -> ResourceDef {
    ResourceDef {
        group: group.into(),
        version: version.into(),
        resource: resource.into(),
        singular: kind.to_lowercase(),
        kind: kind.into(),
        list_kind: format!("{kind}List"),
        namespaced,
        short_names: short.iter().map(|s| s.to_string()).collect(),
        status_subresource: false,
        custom: false,
        columns: vec![Column::age()],
    }
}

/// The table of resources: built-ins first, then those of CRDs.
#[derive(Debug, Clone)]
pub struct Registry {
    defs: Vec<ResourceDef>,
}

pub const CRD_GROUP: &str = "apiextensions.k8s.io";
pub const CRD_RESOURCE: &str = "customresourcedefinitions";

impl Default for Registry {
    fn default() -> Self {
        let mut nodes = builtin("", "v1", "nodes", "Node", false, &["no"]);
        nodes.status_subresource = true;
        nodes.columns = vec![
            Column::computed("Status", "string", CellSource::NodeStatus),
            Column::computed("Roles", "string", CellSource::NodeRoles),
            Column::age(),
            Column::path("Version", "string", ".status.nodeInfo.kubeletVersion"),
        ];
        let mut namespaces = builtin("", "v1", "namespaces", "Namespace", false, &["ns"]);
        namespaces.status_subresource = true;
        namespaces.columns = vec![
            Column::path("Status", "string", ".status.phase"),
            Column::age(),
        ];
        let mut services = builtin("", "v1", "services", "Service", true, &["svc"]);
        services.status_subresource = true;
        services.columns = vec![
            Column::path("Type", "string", ".spec.type"),
            Column::path("Cluster-IP", "string", ".spec.clusterIP"),
            Column::computed("Port(s)", "string", CellSource::ServicePorts),
            Column::age(),
        ];
        let mut pods = builtin("", "v1", "pods", "Pod", true, &["po"]);
        pods.status_subresource = true;
        let mut slices = builtin(
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            "EndpointSlice",
            true,
            &[],
        );
        slices.columns = vec![
            Column::path("AddressType", "string", ".addressType"),
            Column::computed("Ports", "string", CellSource::SlicePorts),
            Column::computed("Endpoints", "string", CellSource::SliceEndpoints),
            Column::age(),
        ];
        let mut policies = builtin(
            "networking.k8s.io",
            "v1",
            "networkpolicies",
            "NetworkPolicy",
            true,
            &["netpol"],
        );
        policies.columns = vec![
            Column::path("Pod-Selector", "string", ".spec.podSelector.matchLabels"),
            Column::age(),
        ];
        let mut leases = builtin("coordination.k8s.io", "v1", "leases", "Lease", true, &[]);
        leases.columns = vec![
            Column::path("Holder", "string", ".spec.holderIdentity"),
            Column::age(),
        ];
        let mut crds = builtin(
            CRD_GROUP,
            "v1",
            CRD_RESOURCE,
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
        );
        crds.status_subresource = true;
        crds.columns = vec![Column::path(
            "Created At",
            "string",
            ".metadata.creationTimestamp",
        )];
        Registry {
            defs: vec![
                nodes,
                namespaces,
                services,
                pods,
                builtin("", "v1", "configmaps", "ConfigMap", true, &["cm"]),
                builtin("", "v1", "events", "Event", true, &["ev"]),
                slices,
                policies,
                leases,
                crds,
            ],
        }
    }
}

impl Registry {
    pub fn find(&self, group: &str, version: &str, resource: &str) -> Option<&ResourceDef> {
        self.defs
            .iter()
            .find(|d| d.group == group && d.version == version && d.resource == resource)
    }

    pub fn all(&self) -> &[ResourceDef] {
        &self.defs
    }

    /// Groups in first-registered order, each with its versions (the first is preferred).
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for d in &self.defs {
            match groups.iter_mut().find(|(g, _)| *g == d.group) {
                Some((_, versions)) if !versions.contains(&d.version) => {
                    versions.push(d.version.clone())
                }
                Some(_) => {}
                None => groups.push((d.group.clone(), vec![d.version.clone()])),
            }
        }
        groups
    }

    /// Registers (or re-registers) the resource a CRD defines; returns its group and plural.
    pub fn register_crd(&mut self, crd: &Value) -> Result<(String, String), String> {
        let spec = &crd["spec"];
        let text = |v: &Value| v.as_str().map(str::to_string);
        let group = text(&spec["group"]).ok_or("spec.group is required")?;
        let names = &spec["names"];
        let plural = text(&names["plural"]).ok_or("spec.names.plural is required")?;
        let kind = text(&names["kind"]).ok_or("spec.names.kind is required")?;
        let expected = format!("{plural}.{group}");
        if crd["metadata"]["name"].as_str() != Some(expected.as_str()) {
            return Err(format!("metadata.name must be {expected}"));
        }
        let namespaced = match spec["scope"].as_str() {
            Some("Namespaced") => true,
            Some("Cluster") => false,
            _ => return Err("spec.scope must be Namespaced or Cluster".into()),
        };
        let versions = spec["versions"]
            .as_array()
            .filter(|v| !v.is_empty())
            .ok_or("spec.versions is required")?;
        self.unregister(&group, &plural);
        for v in versions {
            if v["served"].as_bool() == Some(false) {
                continue;
            }
            let version = text(&v["name"]).ok_or("spec.versions[].name is required")?;
            let mut columns: Vec<Column> = v["additionalPrinterColumns"]
                .as_array()
                .map(|cols| {
                    cols.iter()
                        .filter_map(|c| {
                            Some(Column {
                                name: text(&c["name"])?,
                                kind: text(&c["type"]).unwrap_or_else(|| "string".into()),
                                description: text(&c["description"]).unwrap_or_default(),
                                priority: c["priority"].as_i64().unwrap_or(0),
                                source: CellSource::Path(text(&c["jsonPath"])?),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            if columns.is_empty() {
                columns.push(Column::age());
            }
            self.defs.push(ResourceDef {
                group: group.clone(),
                version,
                resource: plural.clone(),
                singular: text(&names["singular"]).unwrap_or_else(|| kind.to_lowercase()),
                list_kind: text(&names["listKind"]).unwrap_or_else(|| format!("{kind}List")),
                kind: kind.clone(),
                namespaced,
                short_names: names["shortNames"]
                    .as_array()
                    .map(|a| a.iter().filter_map(text).collect())
                    .unwrap_or_default(),
                status_subresource: v["subresources"]["status"].is_object(),
                custom: true,
                columns,
            });
        }
        Ok((group, plural))
    }

    /// Removes every version of a custom resource.
    pub fn unregister(&mut self, group: &str, plural: &str) {
        self.defs
            .retain(|d| !(d.custom && d.group == group && d.resource == plural));
    }
}
