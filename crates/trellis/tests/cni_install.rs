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

/// `trellis uninstall`, run in a namespace made to look like a node Trellis ran on: the
/// relay's and the proxy's nftables tables, the WireGuard interface (a bridge stands in: this kernel has no dummy links)
/// with a route through it, the CNI files and the agent's directories all go; `nft` and
/// `ip` (independent readers) find none of them; a second run finds nothing to remove.
#[test]
fn uninstall_removes_what_trellis_made_on_a_node() {
    let ns = format!("trt-uninst-{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("trt-uninstall-{}", std::process::id()));
    struct Cleanup(String, std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = support::sh(&format!("ip netns delete {}", self.0));
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
    let _cleanup = Cleanup(ns.clone(), dir.clone());
    let paths = ["net.d", "bin", "lib", "run"].map(|d| dir.join(d));
    for p in &paths {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(paths[0].join("10-trellis.conflist"), "{}").unwrap();
    std::fs::write(paths[0].join("20-other.conflist"), "{}").unwrap();
    std::fs::write(paths[1].join("trellis-cni"), "").unwrap();
    std::fs::write(paths[2].join("private.key"), "").unwrap();
    for cmd in [
        format!("ip netns add {ns}"),
        format!("ip -n {ns} link add trellis0 type bridge"),
        format!("ip -n {ns} link set trellis0 up"),
        format!("ip -n {ns} route add 10.244.9.0/24 dev trellis0"),
        format!("ip netns exec {ns} nft add table inet trellis"),
        format!("ip netns exec {ns} nft add table ip trellis-proxy"),
        format!("ip netns exec {ns} nft add table ip keep-me"),
    ] {
        let out = support::sh(&cmd);
        assert!(out.status.success(), "{cmd}: {}", text(&out));
    }
    let exe = env!("CARGO_BIN_EXE_trellis");
    let uninstall = || {
        support::sh(&format!(
            "ip netns exec {ns} {exe} uninstall --conf-dir {} --bin-dir {} --state-dir {} --run-dir {}",
            paths[0].display(),
            paths[1].display(),
            paths[2].display(),
            paths[3].display()
        ))
    };
    let out = uninstall();
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    for what in [
        "inet trellis",
        "ip trellis-proxy",
        "interface trellis0",
        "10-trellis.conflist",
    ] {
        assert!(said.contains("removed") && said.contains(what), "{said}");
    }
    let tables = support::sh(&format!("ip netns exec {ns} nft list tables"));
    let tables = String::from_utf8_lossy(&tables.stdout).into_owned();
    assert_eq!(
        tables.trim(),
        "table ip keep-me",
        "only others' tables stay"
    );
    let links = support::sh(&format!("ip -n {ns} -o link show"));
    assert!(!String::from_utf8_lossy(&links.stdout).contains("trellis0"));
    let routes = support::sh(&format!("ip -n {ns} route show"));
    assert!(!String::from_utf8_lossy(&routes.stdout).contains("10.244.9.0"));
    assert!(
        paths[0].join("20-other.conflist").exists(),
        "others' CNI files stay"
    );
    assert!(!paths[0].join("10-trellis.conflist").exists());
    assert!(!paths[1].join("trellis-cni").exists());
    assert!(!paths[2].exists() && !paths[3].exists());

    let again = uninstall();
    assert!(again.status.success(), "{}", text(&again));
    assert!(!text(&again).contains("removed"), "{}", text(&again));
    let bad = trellis(&["uninstall", "--store", "etcd://h:1"]);
    assert!(
        !bad.status.success() && text(&bad).contains("--store"),
        "{}",
        text(&bad)
    );
}
