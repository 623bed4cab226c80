//! The API server's defaulting of a Service (`SetDefaults_Service`): what a stored Service
//! holds that its manifest may leave out. Addresses, families and node ports depend on the
//! cluster and what is taken, so the allocator fills those.

use super::{
    ClientIpConfig, DEFAULT_AFFINITY_TIMEOUT_SECONDS, Service, ServiceType, SessionAffinity,
    SessionAffinityConfig, TrafficPolicy,
};

impl Service {
    pub fn set_defaults(&mut self) {
        let spec = &mut self.spec;
        // An empty clusterIP asks for one to be allocated, exactly as an absent one.
        if spec.cluster_ip.as_deref() == Some("") {
            spec.cluster_ip = None;
        }
        if spec.cluster_ip.is_none() {
            spec.cluster_ip = spec.cluster_ips.first().cloned();
        }
        for port in &mut spec.ports {
            port.target_port = Some(port.target_port());
            if port.node_port == Some(0) {
                port.node_port = None;
            }
        }
        if spec.health_check_node_port == Some(0) {
            spec.health_check_node_port = None;
        }
        if spec.session_affinity == SessionAffinity::ClientIP {
            let client_ip = spec
                .session_affinity_config
                .get_or_insert_with(SessionAffinityConfig::default)
                .client_ip
                .get_or_insert_with(ClientIpConfig::default);
            client_ip
                .timeout_seconds
                .get_or_insert(DEFAULT_AFFINITY_TIMEOUT_SECONDS);
        }
        if matches!(
            spec.type_,
            ServiceType::NodePort | ServiceType::LoadBalancer
        ) {
            spec.external_traffic_policy
                .get_or_insert(TrafficPolicy::Cluster);
        }
        if spec.type_ != ServiceType::ExternalName {
            spec.internal_traffic_policy
                .get_or_insert(TrafficPolicy::Cluster);
        }
        if spec.type_ == ServiceType::LoadBalancer {
            spec.allocate_load_balancer_node_ports.get_or_insert(true);
        }
    }
}
