//! The control plane at fleet scale, in simulated time: the real master and
//! the real host links over turmoil's network, with racks cut off and
//! healed. Every run is fixed by its seed.

use std::time::Duration;

use cocalc_core::{HostId, HostState, ProjectId};
use cocalc_master::Caller;
use cocalc_sim::{Fleet, FleetConfig};

/// A user with `n` projects, each opened once (placed) and started on the
/// host the master named, as the user's first data-plane request would.
fn open_projects(fleet: &mut Fleet, n: usize) -> (Caller, Vec<ProjectId>) {
    let admin = fleet.admin();
    let user = fleet.call(move |m| async move {
        let (_, key) = m.create_user(&admin, "alice").expect("create user");
        m.authenticate(&key).expect("the new key")
    });
    let mut projects = Vec::new();
    for i in 0..n {
        let caller = user.clone();
        let opened = fleet.call(move |m| async move {
            let p = m
                .create_project(&caller, &format!("p{i}"), None)
                .await
                .expect("create project");
            m.open_project(&caller, p.id).await.expect("open project")
        });
        let host = fleet.host(opened.host).expect("placed on a fleet host");
        host.model
            .start(opened.project, opened.generation)
            .expect("a first start is never stale");
        projects.push(opened.project);
    }
    (user, projects)
}

fn hosts_in_state(fleet: &mut Fleet, hosts: &[HostId], state: HostState) -> usize {
    hosts
        .iter()
        .filter(|h| fleet.state_of(**h) == Some(state))
        .count()
}

#[test]
fn a_thousand_hosts_register_and_keep_their_leases() {
    let mut fleet = Fleet::new(FleetConfig::new(1000).seed(11));
    let took = fleet.run_until(Duration::from_secs(60), |f| {
        f.hosts().iter().all(|h| h.model.key_sets() > 0)
    });
    assert!(took.is_some(), "every host registered within a minute");
    // Five minutes is several keepalive intervals (1000 hosts at 50 beats/s:
    // 20 s) and lease lengths (3 intervals): a lease that is not renewed
    // would have run out.
    fleet.run_for(Duration::from_secs(300));
    let states = fleet.states();
    assert_eq!(states.up, 1000, "{states:?}");
    for h in fleet.hosts() {
        assert_eq!(
            h.acl.master_down_since(),
            None,
            "host {} sees the master up",
            h.name
        );
    }
}

#[test]
fn a_rack_cut_off_goes_down_gets_no_projects_and_comes_back() {
    let mut cfg = FleetConfig::new(400).seed(23);
    cfg.racks = 8;
    let mut fleet = Fleet::new(cfg);
    fleet.run_for(Duration::from_secs(30));
    assert_eq!(fleet.states().up, 400);

    let cut = fleet.rack(3);
    assert_eq!(cut.len(), 50);
    fleet.partition(3);
    // 400 hosts: keepalives every 8 s, leases of 3 beats (jittered by 10 %).
    let took = {
        let start = fleet.elapsed();
        loop {
            if hosts_in_state(&mut fleet, &cut, HostState::Down) == cut.len() {
                break fleet.elapsed() - start;
            }
            assert!(
                fleet.elapsed() - start < Duration::from_secs(60),
                "the cut rack's leases ran out within a minute"
            );
            fleet.run_for(Duration::from_secs(1));
        }
    };
    assert!(
        took >= Duration::from_secs(15),
        "a lease lasts about three 8 s beats, not {took:?}"
    );
    assert_eq!(fleet.states().up, 350, "only the cut rack went down");
    // The hosts notice a little later than the master: beats go on the
    // push channel, which a cut does not close; after three intervals
    // without a lease back the link falls back to HTTP, and that call
    // fails after the 5 s connect timeout.
    let noticed = fleet.run_until(Duration::from_secs(45) - took, |f| {
        f.hosts()
            .iter()
            .filter(|h| h.rack == 3)
            .all(|h| h.acl.master_down_since().is_some())
    });
    assert!(
        noticed.is_some(),
        "the cut hosts saw the master gone within 45 s of the cut"
    );
    for h in fleet.hosts() {
        assert_eq!(
            h.acl.master_down_since().is_some(),
            h.rack == 3,
            "host {} (rack {}) knows whether it reaches the master",
            h.name,
            h.rack
        );
    }

    // Placement skips the hosts that are down.
    let (_, projects) = open_projects(&mut fleet, 40);
    for p in &projects {
        let placed = fleet.placement(*p).expect("placed");
        assert!(!cut.contains(&placed.host), "{p} placed on a cut host");
    }

    fleet.repair(3);
    let back = fleet.run_until(Duration::from_secs(120), |f| {
        f.hosts()
            .iter()
            .all(|h| h.acl.master_down_since().is_none())
    });
    assert!(back.is_some(), "every host of the rack reconnected");
    // A push channel that reopens with the lease late beats at once and
    // wakes the keepalive loop, so the lease does not wait out the link's
    // backoff (up to 30 s).
    fleet.run_for(Duration::from_secs(5));
    assert_eq!(fleet.states().up, 400, "{:?}", fleet.states());
}

#[test]
fn a_project_re_placed_while_its_host_was_cut_off_stops_there_when_it_returns() {
    let mut cfg = FleetConfig::new(40).seed(5);
    cfg.racks = 4;
    let mut fleet = Fleet::new(cfg);
    fleet.run_for(Duration::from_secs(10));
    let (_, projects) = open_projects(&mut fleet, 40);

    // Cut off the rack of the first project's host and wait for the master
    // to see its hosts down.
    let first = projects[0];
    let old = fleet.placement(first).expect("placed");
    let rack = fleet.host(old.host).expect("fleet host").rack;
    let cut = fleet.rack(rack);
    fleet.partition(rack);
    let took = fleet.run_until(Duration::from_secs(60), |f| {
        let m = f.master_now();
        m.iter()
            .filter(|(h, _)| cut.contains(h))
            .all(|(_, s)| *s == HostState::Down)
    });
    assert!(took.is_some(), "the cut rack went down at the master");

    // An operator re-places every project of the cut rack; each starts
    // where it went, as its users come back.
    let admin = fleet.admin();
    let mut moved = Vec::new();
    for p in &projects {
        let placed = fleet.placement(*p).expect("placed");
        if !cut.contains(&placed.host) {
            continue;
        }
        let admin = admin.clone();
        let p = *p;
        let new = fleet.call(move |m| async move { m.replace_project(&admin, p).await });
        let new = new.expect("re-placed");
        assert!(!cut.contains(&new.host), "not onto a cut host");
        assert_eq!(new.generation.0, placed.generation.0 + 1);
        fleet
            .host(new.host)
            .expect("fleet host")
            .model
            .start(p, new.generation)
            .expect("the new generation starts");
        moved.push((p, placed.host, new.host));
    }
    assert!(!moved.is_empty());
    // While the cut lasts, the old hosts cannot be told: both run.
    assert_eq!(fleet.double_runs().len(), moved.len());

    fleet.repair(rack);
    let settled = fleet.run_until(Duration::from_secs(60), |f| f.double_runs().is_empty());
    assert!(
        settled.is_some(),
        "a minute after the cut healed, projects still run on two hosts: {:?}",
        fleet.double_runs()
    );
    for (p, old_host, new_host) in &moved {
        let old = fleet.host(*old_host).expect("fleet host");
        assert_eq!(old.model.running(*p), None, "{p} stopped on {old_host}");
        assert!(
            old.model.start(*p, cocalc_core::Generation(1)).is_err(),
            "{p}: the old host refuses the old generation from now on"
        );
        assert!(fleet.host(*new_host).unwrap().model.running(*p).is_some());
    }
}

/// A small deterministic generator for the scenario's choices.
struct Choices(u64);

impl Choices {
    fn below(&mut self, n: u64) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n.max(1)
    }
}

/// Random cuts and heals of racks, new projects and re-placements off
/// hosts that are down; then every cut heals. Whatever happened, once the
/// fleet has settled every running project runs on the one host the map
/// names, at the map's generation, and every host is up.
fn cuts_and_re_placements(seed: u64) {
    let mut cfg = FleetConfig::new(120).seed(seed);
    cfg.racks = 6;
    let mut fleet = Fleet::new(cfg);
    fleet.run_for(Duration::from_secs(10));
    let (user, mut projects) = open_projects(&mut fleet, 30);
    let admin = fleet.admin();
    let mut choices = Choices(seed);
    let mut cut = std::collections::BTreeSet::new();
    let (mut cuts, mut replaced, mut opened) = (0, 0, 0);
    for round in 0..24 {
        match choices.below(4) {
            // Cut a rack, leaving at least two reachable.
            0 if cut.len() < 4 => {
                let rack = choices.below(6) as usize;
                if cut.insert(rack) {
                    fleet.partition(rack);
                    cuts += 1;
                }
            }
            1 => {
                if let Some(&rack) = cut.iter().nth(choices.below(cut.len() as u64) as usize) {
                    cut.remove(&rack);
                    fleet.repair(rack);
                }
            }
            2 => {
                let caller = user.clone();
                let opened_now = fleet.call(move |m| async move {
                    let p = m
                        .create_project(&caller, &format!("r{round}"), None)
                        .await
                        .expect("create project");
                    m.open_project(&caller, p.id).await
                });
                let o = opened_now.expect("a new project is placed on a host that is up");
                assert_eq!(
                    fleet.state_of(o.host),
                    Some(HostState::Up),
                    "placed on a host the master sees up"
                );
                fleet
                    .host(o.host)
                    .unwrap()
                    .model
                    .start(o.project, o.generation)
                    .expect("first start");
                projects.push(o.project);
                opened += 1;
            }
            _ => {
                // Re-place every project whose host the master sees down.
                for p in projects.clone() {
                    let placed = fleet.placement(p).expect("placed");
                    if fleet.state_of(placed.host) != Some(HostState::Down) {
                        continue;
                    }
                    let admin = admin.clone();
                    let new = match fleet
                        .call(move |m| async move { m.replace_project(&admin, p).await })
                    {
                        Ok(new) => new,
                        // The host came back between the look and the
                        // call: the master refuses, as it should.
                        Err(cocalc_master::MasterError::Conflict(why)) if why.contains("is up") => {
                            continue
                        }
                        Err(e) => panic!("seed {seed}: re-placing {p}: {e}"),
                    };
                    fleet
                        .host(new.host)
                        .unwrap()
                        .model
                        .start(p, new.generation)
                        .expect("the new generation starts");
                    replaced += 1;
                }
            }
        }
        fleet.run_for(Duration::from_secs(5 + choices.below(40)));
    }
    for rack in std::mem::take(&mut cut) {
        fleet.repair(rack);
    }
    let settled = fleet.run_until(Duration::from_secs(120), |f| {
        f.double_runs().is_empty()
            && f.hosts()
                .iter()
                .all(|h| h.acl.master_down_since().is_none())
    });
    assert!(
        settled.is_some(),
        "seed {seed}: not settled two minutes after the last heal: {:?}",
        fleet.double_runs()
    );
    fleet.run_for(Duration::from_secs(10));
    assert_eq!(fleet.states().up, 120, "seed {seed}");
    for p in &projects {
        let placed = fleet.placement(*p).expect("placed");
        for h in fleet.hosts() {
            match h.model.running(*p) {
                Some(g) => assert!(
                    h.id == placed.host && g == placed.generation,
                    "seed {seed}: {p} runs on {} at {g:?}; the map says {} at {:?}",
                    h.name,
                    placed.host,
                    placed.generation
                ),
                None => assert_ne!(h.id, placed.host, "seed {seed}: {p} stopped where placed"),
            }
        }
    }
    eprintln!(
        "seed {seed}: {cuts} cuts, {opened} opened, {replaced} re-placed, {} projects",
        projects.len()
    );
}

#[test]
fn random_cuts_and_re_placements_settle_to_one_host_per_project() {
    for seed in 1..=6 {
        cuts_and_re_placements(seed);
    }
}

#[test]
fn a_burst_of_opens_between_two_keepalives_spreads_over_the_hosts() {
    let mut fleet = Fleet::new(FleetConfig::new(20).seed(3));
    fleet.run_for(Duration::from_secs(10));
    let admin = fleet.admin();
    // A class of 100 opens its projects at once: all between two beats.
    let opened = fleet.call(move |m| async move {
        let (_, key) = m.create_user(&admin, "teacher").expect("create user");
        let user = m.authenticate(&key).expect("the new key");
        let mut opened = Vec::new();
        for i in 0..100 {
            let p = m
                .create_project(&user, &format!("s{i}"), None)
                .await
                .expect("create project");
            opened.push(m.open_project(&user, p.id).await.expect("open"));
        }
        opened
    });
    let mut per_host = std::collections::HashMap::new();
    for o in &opened {
        *per_host.entry(o.host).or_insert(0) += 1;
    }
    assert_eq!(per_host.len(), 20, "every host got some: {per_host:?}");
    assert!(
        per_host.values().all(|n| *n == 5),
        "five each, as least-loaded would with fresh load: {per_host:?}"
    );
}

#[test]
fn a_sign_out_reaches_a_cut_off_host_when_it_returns() {
    let mut cfg = FleetConfig::new(40).seed(9);
    cfg.racks = 4;
    let mut fleet = Fleet::new(cfg);
    fleet.run_for(Duration::from_secs(10));
    let (user, _) = open_projects(&mut fleet, 8);
    let alice = match &user {
        Caller::User(u) => u.id,
        other => panic!("not a user: {other:?}"),
    };
    let knows = |h: &cocalc_sim::SimHost| h.acl.revocations().0.iter().any(|(u, _)| *u == alice);

    fleet.partition(2);
    fleet.run_for(Duration::from_secs(1));
    let admin = fleet.admin();
    let pushed = fleet.call(move |m| async move {
        m.sign_out_everywhere(&admin, &alice.to_string())
            .expect("sign out")
    });
    assert!(pushed >= 30, "pushed to the hosts connected: {pushed}");
    fleet.run_for(Duration::from_secs(2));
    for h in fleet.hosts() {
        assert_eq!(
            knows(h),
            h.rack != 2,
            "host {} (rack {}): the sign-out arrived at once where connected",
            h.name,
            h.rack
        );
    }

    // The cut lasts past the hosts' lease; when it heals, each host of the
    // rack learns the sign-out as its push channel opens again, not after
    // its cached entries expire (five minutes by default).
    fleet.run_for(Duration::from_secs(40));
    fleet.repair(2);
    let took = fleet.run_until(Duration::from_secs(60), |f| f.hosts().iter().all(knows));
    assert!(
        took.is_some(),
        "the cut rack learned the sign-out within a minute of the heal"
    );
}
