//! The proxy's identity for the control plane: Istio's node id and metadata.
//!
//! The id is `<type>~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`, the type being Istio's proxy
//! type (`ztunnel`, or `waypoint` as `pilot-agent proxy waypoint` sends it); the metadata
//! carries the pod's name, namespace, IPs, node and cluster id under Istio's keys, plus
//! whatever the program adds.

use std::collections::BTreeMap;

use mesh_proto::envoy::service::discovery::v3::Node;
use prost_types::{Struct, Value, value::Kind};

/// Who this proxy is: the fields every mesh proxy reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub instance_ip: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub node_name: String,
    pub cluster_id: String,
}

impl NodeInfo {
    /// Istio's node of type `node_type` (`ztunnel`, `waypoint`), with `extra` metadata
    /// besides the common keys; the user agent is `mesh-<node_type>` and the node's cluster
    /// is left empty (the caller sets it where Istio does).
    pub fn to_node(&self, node_type: &str, extra: &[(&str, &str)]) -> Node {
        let s = |v: &str| Value {
            kind: Some(Kind::StringValue(v.to_owned())),
        };
        let mut fields = BTreeMap::from([
            ("NAME".to_owned(), s(&self.pod_name)),
            ("NAMESPACE".to_owned(), s(&self.pod_namespace)),
            ("INSTANCE_IPS".to_owned(), s(&self.instance_ip)),
            ("NODE_NAME".to_owned(), s(&self.node_name)),
            ("CLUSTER_ID".to_owned(), s(&self.cluster_id)),
        ]);
        fields.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), s(v))));
        Node {
            id: format!(
                "{node_type}~{}~{}.{}~{}.svc.cluster.local",
                self.instance_ip, self.pod_name, self.pod_namespace, self.pod_namespace
            ),
            metadata: Some(Struct { fields }),
            user_agent_name: format!("mesh-{node_type}"),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_names_the_type_and_metadata_the_pod() {
        let n = NodeInfo {
            instance_ip: "10.0.0.1".into(),
            pod_name: "p".into(),
            pod_namespace: "ns".into(),
            node_name: "n1".into(),
            cluster_id: "Kubernetes".into(),
        }
        .to_node("waypoint", &[("GATEWAY_NAME", "gw")]);
        assert_eq!(n.id, "waypoint~10.0.0.1~p.ns~ns.svc.cluster.local");
        assert_eq!(n.user_agent_name, "mesh-waypoint");
        let md = n.metadata.unwrap().fields;
        assert_eq!(md.len(), 6);
        assert_eq!(
            md["GATEWAY_NAME"].kind,
            Some(Kind::StringValue("gw".into()))
        );
    }
}
