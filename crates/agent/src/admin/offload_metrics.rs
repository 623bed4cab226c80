//! The userspace device's segmentation offloads as metrics (`trellis_userspace_*`), read
//! from the device at each scrape: whether the kernel granted them and whether traffic
//! really moves in batches. Nothing is exported before the device exists or for the kernel
//! module.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use std::sync::{Arc, OnceLock};
use trellis_dataplane::wireguard::WireGuardDevice;

/// Set once, when the agent has its device.
#[derive(Clone, Default)]
pub struct DeviceOffloads(Arc<OnceLock<Arc<dyn WireGuardDevice>>>);

impl std::fmt::Debug for DeviceOffloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceOffloads")
            .field("device", &self.0.get().map(|d| d.name().to_string()))
            .finish()
    }
}

impl DeviceOffloads {
    pub fn watch(&self, device: Arc<dyn WireGuardDevice>) {
        let _ = self.0.set(device);
    }
}

impl Collector for DeviceOffloads {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(report) = self.0.get().and_then(|device| device.offloads()) else {
            return Ok(());
        };
        let granted = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "userspace_offload_granted",
            "1 where the kernel granted the TUN device this segmentation offload (tso, uso)",
            None,
            granted.metric_type(),
        )?;
        for (offload, on) in [("tso", report.granted.tso), ("uso", report.granted.uso)] {
            let labels = [("offload", offload)];
            ConstGauge::new(i64::from(on)).encode(family.encode_family(&labels)?)?;
        }
        let usage = report.usage;
        let counters = [
            (
                "userspace_tun_reads_segmented",
                "TUN reads that carried more than one packet (a whole TCP or UDP send)",
                usage.tun_super_reads,
            ),
            (
                "userspace_tun_packets_read",
                "Packets cut from TUN reads",
                usage.tun_packets_read,
            ),
            (
                "userspace_tun_writes_coalesced",
                "TUN writes that carried more than one packet, merged",
                usage.tun_coalesced_writes,
            ),
            (
                "userspace_tun_packets_written",
                "Packets written to the TUN device, merged or not",
                usage.tun_packets_written,
            ),
            (
                "userspace_udp_sends_segmented",
                "UDP sends of a run of datagrams as one (UDP_SEGMENT)",
                usage.udp_segmented_sends,
            ),
            (
                "userspace_udp_datagrams_segmented",
                "Datagrams carried by segmented UDP sends",
                usage.udp_segmented_datagrams,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::metrics::Metrics;
    use async_trait::async_trait;
    use std::sync::Arc;
    use std::time::Instant;
    use trellis_dataplane::wireguard::offload::{Granted, Report, Usage};
    use trellis_dataplane::wireguard::{PeerConfig, PeerStatus, WireGuardDevice};
    use trellis_model::PublicKey;

    struct Offloading;

    #[async_trait]
    impl WireGuardDevice for Offloading {
        fn name(&self) -> &str {
            "tw0"
        }
        async fn peers(&self) -> trellis_dataplane::Result<Vec<PeerStatus>> {
            Ok(Vec::new())
        }
        async fn upsert_peer(&self, _: &PeerConfig) -> trellis_dataplane::Result<()> {
            Ok(())
        }
        async fn remove_peer(&self, _: &PublicKey) -> trellis_dataplane::Result<()> {
            Ok(())
        }
        fn offloads(&self) -> Option<Report> {
            Some(Report {
                granted: Granted {
                    tso: true,
                    uso: false,
                },
                usage: Usage {
                    tun_super_reads: 3,
                    tun_packets_read: 120,
                    tun_coalesced_writes: 4,
                    tun_packets_written: 90,
                    udp_segmented_sends: 5,
                    udp_segmented_datagrams: 110,
                },
            })
        }
    }

    #[test]
    fn the_devices_offloads_are_exported_once_it_exists() {
        let metrics = Metrics::new("n1");
        assert!(
            !metrics.render(Instant::now()).contains("userspace"),
            "nothing before the device exists"
        );
        metrics.watch_device(Arc::new(Offloading));
        let text = metrics.render(Instant::now());
        for (sample, value) in [
            (
                "trellis_userspace_offload_granted{node=\"n1\",offload=\"tso\"}",
                "1",
            ),
            (
                "trellis_userspace_offload_granted{node=\"n1\",offload=\"uso\"}",
                "0",
            ),
            (
                "trellis_userspace_tun_reads_segmented_total{node=\"n1\"}",
                "3",
            ),
            (
                "trellis_userspace_tun_packets_read_total{node=\"n1\"}",
                "120",
            ),
            (
                "trellis_userspace_tun_writes_coalesced_total{node=\"n1\"}",
                "4",
            ),
            (
                "trellis_userspace_tun_packets_written_total{node=\"n1\"}",
                "90",
            ),
            (
                "trellis_userspace_udp_sends_segmented_total{node=\"n1\"}",
                "5",
            ),
            (
                "trellis_userspace_udp_datagrams_segmented_total{node=\"n1\"}",
                "110",
            ),
        ] {
            let line = format!("{sample} {value}");
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
