//! Annotation keys.

/// What an agent publishes on its own Node (the node record's fields that Kubernetes has no
/// place for).
pub mod trellis {
    pub const PUBLIC_KEY: &str = "trellis.network/public-key";
    /// Address and prefix on the location's internal network.
    pub const INTERNAL_IP: &str = "trellis.network/internal-ip";
    /// `host:port` other locations reach the node's WireGuard port at; absent: private.
    pub const ENDPOINT: &str = "trellis.network/endpoint";
    pub const LISTEN_PORT: &str = "trellis.network/listen-port";
    pub const OVERLAY_IP: &str = "trellis.network/overlay-ip";
    pub const PROBE_IP: &str = "trellis.network/probe-ip";
    /// `eligible` or `ineligible`, then optionally `,priority=N`.
    pub const GATEWAY: &str = "trellis.network/gateway";
    /// Seconds; what every peer of the node sends it (the agent's --persistent-keepalive).
    pub const PERSISTENT_KEEPALIVE: &str = "trellis.network/persistent-keepalive";
    /// Comma-separated CIDRs of the node's location's own network (--location-prefix).
    pub const LOCATION_PREFIXES: &str = "trellis.network/location-prefixes";

    /// Every key Trellis writes, for uninstalling.
    pub const ALL: [&str; 9] = [
        PUBLIC_KEY,
        INTERNAL_IP,
        ENDPOINT,
        LISTEN_PORT,
        OVERLAY_IP,
        PROBE_IP,
        GATEWAY,
        PERSISTENT_KEEPALIVE,
        LOCATION_PREFIXES,
    ];
}

/// Kilo's user-set annotations, honoured over what the agent published.
pub mod kilo {
    /// The node's location; without it, the `topology.kubernetes.io/region` label.
    pub const LOCATION: &str = "kilo.squat.ai/location";
    /// `host:port` (DNS allowed): where other locations reach the node.
    pub const FORCE_ENDPOINT: &str = "kilo.squat.ai/force-endpoint";
    /// A CIDR; `""` or `"-"` in Kilo means no internal address.
    pub const FORCE_INTERNAL_IP: &str = "kilo.squat.ai/force-internal-ip";
    /// Seconds.
    pub const PERSISTENT_KEEPALIVE: &str = "kilo.squat.ai/persistent-keepalive";
    /// Present: the node is preferred as its location's gateway ("leader" in Kilo).
    pub const LEADER: &str = "kilo.squat.ai/leader";
    /// Comma-separated CIDRs routed to the node's location.
    pub const ALLOWED_LOCATION_IPS: &str = "kilo.squat.ai/allowed-location-ips";
}

/// The well-known label Kubernetes puts a node's region in.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
