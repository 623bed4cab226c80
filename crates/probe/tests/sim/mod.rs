//! A simulated network for the prober, in the style of quinn-proto's test harness: a
//! virtual clock, observers each running a real [`Prober`] behind a minimal driver, and
//! packets that the test loses, delays, reorders and cuts. Deterministic: everything
//! random comes from one seeded generator, so a failing run replays exactly.
//!
//! The shape follows the lab: nodes in locations, each with a public and an internal
//! port. A relayed gateway probe goes observer → gateway → a node behind it and back
//! (four hops, eight lossy port crossings); a direct-path probe goes to the peer and back
//! (two hops, four crossings). Hops between locations go through a WireGuard tunnel,
//! ideal unless [`Sim::with_wireguard`] asks for the handshake model.

#![allow(dead_code)]

pub mod rng;
pub mod wireguard;

use rng::Rng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use trellis_plan::health::{ID_RANGE_SIZE, UNRELAYED_ID_RANGE};
use trellis_probe::{
    Echo, Event, PathTarget, ProbeConfig, ProbeTarget, Prober, Reply, Subject, Targets,
};
use wireguard::{Action, Wire, WireGuard};

pub type NodeId = usize;

/// What a gateway does with the probes it should relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    Healthy,
    /// Forwards nothing.
    Dead,
    /// Still forwards the flows it forwarded before, but no new one: drops any probe
    /// whose echo id it has not forwarded before (the seed-000 fault).
    OldFlowsOnly,
}

#[derive(Clone, Copy, Debug)]
enum Stage {
    /// Observer to the probe address's owner.
    Out,
    /// Gateway to the node behind it (relayed probes).
    Relayed,
    /// That node's answer back to the gateway.
    Answer,
    /// Back to the observer.
    Back,
}

#[derive(Clone, Copy, Debug)]
pub struct Probe {
    observer: NodeId,
    target: NodeId,
    relay: Option<NodeId>,
    id: u16,
    seq: u16,
    stage: Stage,
}

/// Events run in time order, and in the order they were scheduled at equal times.
struct Scheduled {
    at: u64,
    order: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

#[derive(Clone, Debug)]
enum Ev {
    Arrive(NodeId, NodeId, Wire<Probe>),
    Wake(NodeId),
    WgTimer(NodeId, NodeId),
    Observe(NodeId, Targets),
}

pub struct Observer {
    pub prober: Prober,
    /// Replies the socket holds, unread.
    inbox: Vec<Reply>,
    timer: Option<u64>,
    pub log: Vec<(u64, Event)>,
}

pub struct Node {
    pub name: String,
    pub location: String,
    pub probe_ip: Ipv4Addr,
    /// The nodes this gateway relays probes to, by id range.
    pub relays: Vec<NodeId>,
    pub behaviour: Behaviour,
    forwarded: HashSet<u16>,
    /// The agent does not run before this (a starved process).
    asleep_until: u64,
    /// The prober's sends fail before this (the probe address is not there yet).
    sends_fail_until: u64,
    pub observer: Option<Observer>,
}

/// How packets travel. Changeable at any time.
#[derive(Clone, Copy, Debug)]
pub struct Links {
    /// Probability that a packet is lost at each port it crosses.
    pub loss: f64,
    /// One-way delay of a hop: base plus uniform jitter.
    pub hop_ms: u64,
    pub jitter_ms: u64,
    /// Probability that a packet is held back by up to `reorder_ms` more.
    pub reorder: f64,
    pub reorder_ms: u64,
}

impl Default for Links {
    fn default() -> Self {
        Self {
            loss: 0.0,
            hop_ms: 2,
            jitter_ms: 1,
            reorder: 0.0,
            reorder_ms: 0,
        }
    }
}

pub struct Sim {
    pub now: u64,
    rng: Rng,
    queue: BinaryHeap<Reverse<Scheduled>>,
    next_order: u64,
    pub nodes: Vec<Node>,
    pub links: Links,
    cuts: HashSet<(NodeId, NodeId)>,
    pub wireguard: Option<WireGuard<Probe>>,
    pub config: ProbeConfig,
}

impl Sim {
    pub fn new(seed: u64) -> Self {
        Self {
            now: 0,
            rng: Rng::new(seed),
            queue: BinaryHeap::new(),
            next_order: 0,
            nodes: Vec::new(),
            links: Links::default(),
            cuts: HashSet::new(),
            wireguard: None,
            config: ProbeConfig::default(),
        }
    }

    /// Tunnels between locations need handshakes; every node must then be told when it
    /// learns each peer's key ([`Sim::configure`]).
    pub fn with_wireguard(mut self) -> Self {
        self.wireguard = Some(WireGuard::new());
        self
    }

    pub fn node(&mut self, name: &str, location: &str) -> NodeId {
        let id = self.nodes.len();
        self.nodes.push(Node {
            name: name.to_string(),
            location: location.to_string(),
            probe_ip: Ipv4Addr::new(100, 66, 0, id as u8 + 1),
            relays: Vec::new(),
            behaviour: Behaviour::Healthy,
            forwarded: HashSet::new(),
            asleep_until: 0,
            sends_fail_until: 0,
            observer: None,
        });
        id
    }

    pub fn id(&self, name: &str) -> NodeId {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .expect("known node")
    }

    pub fn set_relays(&mut self, gateway: NodeId, relays: &[NodeId]) {
        self.nodes[gateway].relays = relays.to_vec();
    }

    /// `node` learns `peer`'s key at `at` (and installs the tunnel's routes).
    pub fn configure(&mut self, node: NodeId, peer: NodeId, at: u64) {
        if let Some(wg) = self.wireguard.as_mut() {
            wg.configure(node, peer, at);
        }
    }

    /// The target list the plan would give an observer watching these gateways and paths.
    pub fn targets(&self, gateways: &[NodeId], paths: &[NodeId]) -> Targets {
        Targets {
            gateways: gateways
                .iter()
                .map(|g| ProbeTarget {
                    gateway: self.nodes[*g].name.clone(),
                    probe_ip: IpAddr::V4(self.nodes[*g].probe_ip),
                    relays: self.nodes[*g].relays.len(),
                })
                .collect(),
            paths: paths
                .iter()
                .map(|p| PathTarget {
                    peer: self.nodes[*p].name.clone(),
                    probe_ip: IpAddr::V4(self.nodes[*p].probe_ip),
                    broken: false,
                })
                .collect(),
        }
    }

    /// Start a prober on `node` now, or give it new targets.
    pub fn observe(&mut self, node: NodeId, targets: Targets) {
        let now = self.now;
        let config = self.config;
        let n = &mut self.nodes[node];
        let o = n.observer.get_or_insert_with(|| Observer {
            prober: Prober::new(config, now),
            inbox: Vec::new(),
            timer: None,
            log: Vec::new(),
        });
        o.prober.set_targets(now, targets);
        self.drive(node);
    }

    /// Start a prober on `node` at `at`, or give it new targets then.
    pub fn observe_at(&mut self, node: NodeId, at: u64, targets: Targets) {
        self.schedule(at, Ev::Observe(node, targets));
    }

    pub fn set_behaviour(&mut self, gateway: NodeId, b: Behaviour) {
        self.nodes[gateway].behaviour = b;
    }

    pub fn cut(&mut self, a: NodeId, b: NodeId) {
        self.cuts.insert((a.min(b), a.max(b)));
    }

    pub fn heal(&mut self, a: NodeId, b: NodeId) {
        self.cuts.remove(&(a.min(b), a.max(b)));
    }

    /// The observer's driver does not run for `for_ms` from now; answers pile up unread.
    pub fn starve(&mut self, node: NodeId, for_ms: u64) {
        let until = self.now + for_ms;
        self.nodes[node].asleep_until = until;
    }

    /// The observer's sends fail until `until`.
    pub fn fail_sends_until(&mut self, node: NodeId, until: u64) {
        self.nodes[node].sends_fail_until = until;
    }

    pub fn observer(&self, node: NodeId) -> &Observer {
        self.nodes[node].observer.as_ref().expect("an observer")
    }

    pub fn run_for(&mut self, ms: u64) {
        self.run_until(self.now + ms);
    }

    pub fn run_until(&mut self, until: u64) {
        while self.queue.peek().is_some_and(|Reverse(s)| s.at <= until) {
            let Reverse(s) = self.queue.pop().expect("peeked");
            self.now = s.at;
            self.handle(s.ev);
        }
        self.now = until;
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.queue.push(Reverse(Scheduled {
            at,
            order: self.next_order,
            ev,
        }));
        self.next_order += 1;
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Wake(node) => self.drive(node),
            Ev::Observe(node, targets) => self.observe(node, targets),
            Ev::WgTimer(node, peer) => {
                let (now, rng) = (self.now, &mut self.rng);
                let actions = match self.wireguard.as_mut() {
                    Some(wg) => wg.timer(now, rng, node, peer),
                    None => Vec::new(),
                };
                self.run_actions(actions);
            }
            Ev::Arrive(from, to, wire) => {
                // A starved agent's userspace WireGuard device does not run either: what
                // arrives through a tunnel is decrypted only once it runs again. What
                // arrives on the internal network waits in the socket.
                let until = self.nodes[to].asleep_until;
                if until > self.now && self.tunneled(from, to) {
                    let at = until + self.rng.between(1, 20);
                    self.schedule(at, Ev::Arrive(from, to, wire));
                    return;
                }
                let tunneled = self.tunneled(from, to);
                match (tunneled, self.wireguard.as_mut(), wire) {
                    (true, Some(wg), wire) => {
                        let actions = wg.receive(self.now, from, to, wire);
                        self.run_actions(actions);
                    }
                    (_, _, Wire::Data(_, probe)) => self.arrive(to, probe),
                    _ => {}
                }
            }
        }
    }

    fn run_actions(&mut self, actions: Vec<Action<Probe>>) {
        for a in actions {
            match a {
                Action::Transmit(from, to, wire) => self.transmit(from, to, wire),
                Action::Timer(at, node, peer) => self.schedule(at, Ev::WgTimer(node, peer)),
                Action::Deliver(to, _, probe) => self.arrive(to, probe),
            }
        }
    }

    fn tunneled(&self, a: NodeId, b: NodeId) -> bool {
        self.nodes[a].location != self.nodes[b].location
    }

    /// One hop of a probe: into the tunnel if it crosses locations.
    fn hop(&mut self, from: NodeId, to: NodeId, probe: Probe) {
        if self.tunneled(from, to)
            && let Some(wg) = self.wireguard.as_mut()
        {
            let actions = wg.send(self.now, &mut self.rng, from, to, probe);
            self.run_actions(actions);
            return;
        }
        self.transmit(from, to, Wire::Data(0, probe));
    }

    /// A frame on the fabric: out of one port, into another.
    fn transmit(&mut self, from: NodeId, to: NodeId, wire: Wire<Probe>) {
        if self.cuts.contains(&(from.min(to), from.max(to))) {
            return;
        }
        let l = self.links;
        if self.rng.chance(l.loss) || self.rng.chance(l.loss) {
            return;
        }
        let mut delay = l.hop_ms + self.rng.between(0, l.jitter_ms);
        if self.rng.chance(l.reorder) {
            delay += self.rng.between(0, l.reorder_ms);
        }
        self.schedule(self.now + delay, Ev::Arrive(from, to, wire));
    }

    fn arrive(&mut self, at: NodeId, probe: Probe) {
        match probe.stage {
            Stage::Out => {
                let range = usize::from(probe.id / ID_RANGE_SIZE);
                if range == UNRELAYED_ID_RANGE {
                    self.hop(
                        at,
                        probe.observer,
                        Probe {
                            stage: Stage::Back,
                            ..probe
                        },
                    );
                    return;
                }
                let gw = &mut self.nodes[at];
                let Some(&relay) = gw.relays.get(range) else {
                    return;
                };
                match gw.behaviour {
                    Behaviour::Healthy => {
                        gw.forwarded.insert(probe.id);
                    }
                    Behaviour::Dead => return,
                    Behaviour::OldFlowsOnly => {
                        if !gw.forwarded.contains(&probe.id) {
                            return;
                        }
                    }
                }
                self.hop(
                    at,
                    relay,
                    Probe {
                        relay: Some(relay),
                        stage: Stage::Relayed,
                        ..probe
                    },
                );
            }
            Stage::Relayed => self.hop(
                at,
                probe.target,
                Probe {
                    stage: Stage::Answer,
                    ..probe
                },
            ),
            Stage::Answer => {
                if self.nodes[at].behaviour == Behaviour::Dead {
                    return;
                }
                self.hop(
                    at,
                    probe.observer,
                    Probe {
                        stage: Stage::Back,
                        ..probe
                    },
                )
            }
            Stage::Back => {
                let from = self.nodes[probe.target].probe_ip;
                let Some(o) = self.nodes[at].observer.as_mut() else {
                    return;
                };
                o.inbox.push(Reply {
                    from,
                    id: probe.id,
                    seq: probe.seq,
                });
                self.schedule(self.now, Ev::Wake(at));
            }
        }
    }

    /// The driver: glue only, in the order the crate documents.
    fn drive(&mut self, node: NodeId) {
        let now = self.now;
        let (asleep_until, sends_fail_until) = {
            let n = &self.nodes[node];
            (n.asleep_until, n.sends_fail_until)
        };
        if now < asleep_until {
            self.schedule(asleep_until, Ev::Wake(node));
            return;
        }
        let Some(o) = self.nodes[node].observer.as_mut() else {
            return;
        };
        for reply in std::mem::take(&mut o.inbox) {
            o.prober.handle_reply(now, reply);
        }
        let due = o.timer.is_some_and(|t| t <= now);
        if due {
            o.prober.handle_timeout(now);
        }
        let mut sent = Vec::new();
        while let Some(echo) = o.prober.poll_transmit() {
            if now < sends_fail_until {
                o.prober.transmit_failed(echo);
            } else {
                sent.push(echo);
            }
        }
        while let Some(event) = o.prober.poll_event() {
            o.log.push((now, event));
        }
        let before = o.timer;
        o.timer = o.prober.poll_timeout();
        let timer = o.timer;
        if let Some(t) = timer
            && (due || before != Some(t))
        {
            self.schedule(t.max(now), Ev::Wake(node));
        }
        for echo in sent {
            self.send_echo(node, echo);
        }
    }

    fn send_echo(&mut self, observer: NodeId, echo: Echo) {
        let Some(target) = self.nodes.iter().position(|n| n.probe_ip == echo.to) else {
            return;
        };
        self.hop(
            observer,
            target,
            Probe {
                observer,
                target,
                relay: None,
                id: echo.id,
                seq: echo.seq,
                stage: Stage::Out,
            },
        );
    }

    // What the observers said.

    pub fn log(&self, node: NodeId) -> &[(u64, Event)] {
        &self.observer(node).log
    }

    /// Opinion changes (not the first "up" of a new subject) of every observer:
    /// (time, observer, subject, up).
    pub fn changes(&self) -> Vec<(u64, String, Subject, bool)> {
        let mut out = Vec::new();
        for n in &self.nodes {
            let Some(o) = &n.observer else { continue };
            for (t, e) in &o.log {
                if let Event::Opinion {
                    subject,
                    up,
                    changed: true,
                } = e
                {
                    out.push((*t, n.name.clone(), subject.clone(), *up));
                }
            }
        }
        out.sort();
        out
    }

    /// Events of `node` about `subject` matching `pred`, with their times.
    pub fn count(&self, node: NodeId, pred: impl Fn(&Event) -> bool) -> usize {
        self.log(node).iter().filter(|(_, e)| pred(e)).count()
    }

    pub fn failed_rounds(&self) -> usize {
        self.nodes
            .iter()
            .filter_map(|n| n.observer.as_ref())
            .flat_map(|o| &o.log)
            .filter(|(_, e)| matches!(e, Event::RoundFailed { .. }))
            .count()
    }

    pub fn rounds_sent(&self) -> usize {
        self.nodes
            .iter()
            .filter_map(|n| n.observer.as_ref())
            .flat_map(|o| &o.log)
            .filter(|(_, e)| matches!(e, Event::Sent { .. }))
            .count()
    }

    /// The first time `node` said `subject` went `up`/down, if it did.
    pub fn first_change(&self, node: NodeId, subject: &Subject, up: bool) -> Option<u64> {
        self.log(node).iter().find_map(|(t, e)| match e {
            Event::Opinion {
                subject: s,
                up: u,
                changed: true,
            } if s == subject && *u == up => Some(*t),
            _ => None,
        })
    }

    /// When `node` first had an answer from `subject` in time.
    pub fn first_answer(&self, node: NodeId, subject: &Subject) -> Option<u64> {
        self.log(node).iter().find_map(|(t, e)| match e {
            Event::RoundAnswered { subject: s, .. } if s == subject => Some(*t),
            _ => None,
        })
    }

    pub fn prober_opinion(&self, node: NodeId, subject: &Subject) -> Option<bool> {
        self.observer(node).prober.opinion(subject)
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }
}

/// Times a majority of a gateway's observers (two or more) held it down at once: what
/// the planner's verdict would act on.
pub fn verdicts_down(changes: &[(u64, String, Subject, bool)]) -> usize {
    let mut down: BTreeMap<&Subject, HashSet<&str>> = BTreeMap::new();
    let mut verdicts = 0;
    for (_, observer, subject, up) in changes {
        if subject.is_path() {
            continue;
        }
        let set = down.entry(subject).or_default();
        let before = set.len() >= 2;
        if *up {
            set.remove(observer.as_str());
        } else {
            set.insert(observer.as_str());
        }
        verdicts += usize::from(!before && set.len() >= 2);
    }
    verdicts
}

/// Per-kind counts of observer opinion changes to "down", for reports.
pub fn downs_by_kind(changes: &[(u64, String, Subject, bool)]) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for (_, _, s, up) in changes {
        if !up {
            *m.entry(if s.is_path() { "path" } else { "gateway" })
                .or_insert(0) += 1;
        }
    }
    m
}

/// One gateway `g` in location a relaying to `r1` and `r2`; observers `o1` and `o2` in
/// location b (public: they also probe their direct path to `g`) and `o3` beside `g`.
pub struct Site {
    pub sim: Sim,
    pub g: NodeId,
    pub r1: NodeId,
    pub r2: NodeId,
    pub o1: NodeId,
    pub o2: NodeId,
    pub o3: NodeId,
}

impl Site {
    pub fn new(seed: u64) -> Self {
        let mut sim = Sim::new(seed);
        let g = sim.node("g", "a");
        let r1 = sim.node("r1", "a");
        let r2 = sim.node("r2", "a");
        let o1 = sim.node("o1", "b");
        let o2 = sim.node("o2", "b");
        let o3 = sim.node("o3", "a");
        sim.set_relays(g, &[r1, r2]);
        Self {
            sim,
            g,
            r1,
            r2,
            o1,
            o2,
            o3,
        }
    }

    /// Every observer starts probing now.
    pub fn start(&mut self) {
        let (g, o1, o2, o3) = (self.g, self.o1, self.o2, self.o3);
        for o in [o1, o2] {
            let t = self.sim.targets(&[g], &[g]);
            self.sim.observe(o, t);
        }
        let t = self.sim.targets(&[g], &[]);
        self.sim.observe(o3, t);
    }

    pub fn observers(&self) -> [NodeId; 3] {
        [self.o1, self.o2, self.o3]
    }

    pub fn gateway(&self) -> Subject {
        Subject::Gateway("g".into())
    }

    pub fn path(&self) -> Subject {
        Subject::Path("g".into())
    }
}

/// The lab of `lab bench false-failover`: locations a and b of three nodes each, two
/// public per location (a1, a2, b1, b2: the gateway candidates, each relaying to its two
/// location mates), granularity `location`. Each candidate is watched by the two public
/// nodes of the other location and by the private node of its own; public nodes probe
/// their direct paths to the other location's public nodes (eight directed paths).
pub struct Lab {
    pub sim: Sim,
    pub public: Vec<NodeId>,
    pub all: Vec<NodeId>,
}

/// How the lab's agents come up.
#[derive(Clone, Copy, Debug)]
pub struct LabStart {
    /// Agents start within this long of each other.
    pub spread_ms: u64,
    /// An agent's first plan is applied up to this long after it registered.
    pub apply_ms: u64,
    /// Loss starts when every agent has applied its plan, as in the bench (else at once).
    pub loss_after_convergence: bool,
    pub loss: f64,
}

impl Lab {
    pub fn new(seed: u64, config: ProbeConfig, start: LabStart) -> Self {
        let mut sim = Sim::new(seed).with_wireguard();
        sim.config = config;
        let names = ["a1", "a2", "a3", "b1", "b2", "b3"];
        let all: Vec<NodeId> = names.iter().map(|n| sim.node(n, &n[..1])).collect();
        let [a1, a2, a3, b1, b2, b3] = all[..] else {
            unreachable!()
        };
        sim.set_relays(a1, &[a2, a3]);
        sim.set_relays(a2, &[a1, a3]);
        sim.set_relays(b1, &[b2, b3]);
        sim.set_relays(b2, &[b1, b3]);
        let public = vec![a1, a2, b1, b2];
        // Each agent creates its device, registers, then applies its first plan (slow on
        // a loaded machine). It learns a peer's key in its first apply, or in the apply
        // after the peer registered if that was later. The probe address appears with the
        // first apply; the prober's socket is opened with a backoff from 50 ms, doubling,
        // so it starts at the first retry after that. The prober is given a target after
        // the apply that configured it.
        let started: Vec<u64> = all
            .iter()
            .map(|_| sim.rng().between(0, start.spread_ms))
            .collect();
        let registered: Vec<u64> = started
            .iter()
            .map(|s| s + sim.rng().between(100, 1_000))
            .collect();
        let first_apply: Vec<u64> = registered
            .iter()
            .map(|r| r + sim.rng().between(200, start.apply_ms.max(200)))
            .collect();
        let mut applied = first_apply.clone();
        let mut configured = vec![vec![0u64; all.len()]; all.len()];
        for &n in &all {
            for &m in &all {
                if n != m {
                    let replan = registered[m] + sim.rng().between(100, 500);
                    let at = first_apply[n].max(replan);
                    sim.configure(n, m, at);
                    configured[n][m] = at;
                    applied[n] = applied[n].max(at);
                }
            }
        }
        for &n in &all {
            let mut socket = started[n];
            let mut step = 50;
            while socket < first_apply[n] {
                socket += step;
                step = (step * 2).min(5_000);
            }
            let other: Vec<NodeId> = all
                .iter()
                .copied()
                .filter(|m| sim.nodes[*m].location != sim.nodes[n].location)
                .collect();
            let mates: Vec<NodeId> = all
                .iter()
                .copied()
                .filter(|m| *m != n && sim.nodes[*m].location == sim.nodes[n].location)
                .collect();
            let (gateways, paths): (Vec<NodeId>, Vec<NodeId>) = if public.contains(&n) {
                let p: Vec<NodeId> = other
                    .iter()
                    .copied()
                    .filter(|m| public.contains(m))
                    .collect();
                (p.clone(), p)
            } else {
                (mates.clone(), Vec::new())
            };
            let appears = |m: NodeId| socket.max(configured[n][m]);
            let mut times: Vec<u64> = gateways.iter().chain(&paths).map(|m| appears(*m)).collect();
            times.sort();
            times.dedup();
            for t in times {
                let g: Vec<NodeId> = gateways
                    .iter()
                    .copied()
                    .filter(|m| appears(*m) <= t)
                    .collect();
                let p: Vec<NodeId> = paths.iter().copied().filter(|m| appears(*m) <= t).collect();
                let targets = sim.targets(&g, &p);
                sim.observe_at(n, t, targets);
            }
        }
        let converged = applied.iter().max().copied().unwrap_or(0) + 300;
        if start.loss_after_convergence {
            sim.run_until(converged);
        }
        sim.links.loss = start.loss;
        let _ = (a3, b3);
        Self { sim, public, all }
    }
}
