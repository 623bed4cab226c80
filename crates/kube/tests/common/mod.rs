//! What the tests against the API double share.

use std::time::Duration;
use trellis_kube::api_address::{ApiAddress, Source};
use trellis_kube::client::Kube;
use trellis_kube_double::{KubeDouble, KubeDoubleHandle};

/// A fresh API double and a client of it, without credentials.
pub async fn double_and_client() -> (KubeDoubleHandle, Kube) {
    let double = KubeDouble::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let address = ApiAddress {
        url: double.url(),
        source: Source::Flag,
    };
    let kube = Kube::new(&address, Duration::from_secs(5)).unwrap();
    (double, kube)
}
