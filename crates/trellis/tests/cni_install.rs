//! `trellis cni install`: what a DaemonSet's init container runs.

mod support;

use support::{text, trellis};

/// The plugin binary and the configuration list land where the runtime looks, runnable
/// and parseable; a second install replaces both; a bad `--chain` is named.
#[test]
fn install_puts_the_plugin_and_its_list_where_the_runtime_looks() {
    let dir = std::env::temp_dir().join(format!("trt-cni-install-{}", std::process::id()));
    let (conf, bin) = (dir.join("net.d"), dir.join("bin"));
    let (conf_s, bin_s) = (conf.to_str().unwrap(), bin.to_str().unwrap());
    let install = |extra: &[&str]| {
        let mut args = vec!["cni", "install", "--conf-dir", conf_s, "--bin-dir", bin_s];
        args.extend_from_slice(extra);
        trellis(&args)
    };
    for _ in 0..2 {
        let out = install(&["--chain", "portmap"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(conf.join("10-trellis.conflist")).unwrap())
            .unwrap();
    assert_eq!(list["name"], "trellis");
    assert_eq!(list["plugins"][0]["type"], "trellis-cni");
    assert_eq!(list["plugins"][1]["type"], "portmap");
    assert_eq!(
        list["plugins"][0]["nodeFile"],
        "/var/lib/trellis/cni/node.json"
    );
    // The installed binary answers VERSION as a runtime would ask it.
    let version = std::process::Command::new(bin.join("trellis-cni"))
        .env("CNI_COMMAND", "VERSION")
        .output()
        .unwrap();
    assert!(version.status.success(), "{version:?}");
    let answer: serde_json::Value = serde_json::from_slice(&version.stdout).unwrap();
    assert!(
        answer["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&"0.3.1".into()),
        "{answer}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&bin)
        .unwrap()
        .chain(std::fs::read_dir(&conf).unwrap())
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "no temporary file left: {leftovers:?}"
    );
    let bad = install(&["--chain", "firewall"]);
    assert!(
        !bad.status.success() && text(&bad).contains("firewall"),
        "{}",
        text(&bad)
    );
    let relative = install(&["--node-file", "node.json"]);
    assert!(
        !relative.status.success() && text(&relative).contains("--node-file"),
        "{}",
        text(&relative)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
