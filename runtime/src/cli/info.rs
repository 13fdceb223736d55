//! ps, list, pause, resume, events, update, spec.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use husk_protocol::agent::StatsContainerResponse;
use husk_runtime::state::{StateStore, Status};
use serde_json::{Map, Value, json};

use super::{GlobalOpts, agent, lifecycle, oci_state};

pub fn ps(g: &GlobalOpts, id: &str, format: &str, ps_args: &[String]) -> Result<()> {
    let store = StateStore::new(&g.root);
    let st = store.load_unlocked(id)?;
    if !matches!(
        st.effective_status(),
        Status::Created | Status::Running | Status::Paused
    ) {
        bail!("container {id:?} is not running");
    }
    if !ps_args.is_empty() {
        tracing::warn!("ps options {ps_args:?} ignored: the processes live in the VM");
    }
    let pids = agent::block_on(async {
        let client = agent::connect(&store, id).await?;
        client
            .list_processes(&st.agent_id)
            .await
            .with_context(|| format!("listing the processes of {id}"))
    })??;
    match format {
        "json" => println!("{}", serde_json::to_string(&pids)?),
        "table" => {
            println!("PID");
            for p in pids {
                println!("{p}");
            }
        }
        other => bail!("invalid format {other:?}: expected table or json"),
    }
    Ok(())
}

pub fn list(g: &GlobalOpts, format: &str, quiet: bool) -> Result<()> {
    let store = StateStore::new(&g.root);
    let mut docs = Vec::new();
    for id in store.list()? {
        // A container being created or deleted right now may have no readable state.
        if let Ok(st) = store.load_unlocked(&id) {
            docs.push(oci_state::document(&st));
        }
    }
    if quiet {
        for d in &docs {
            println!("{}", d["id"].as_str().unwrap_or_default());
        }
        return Ok(());
    }
    match format {
        "json" => println!("{}", serde_json::to_string(&docs)?),
        "table" => {
            println!(
                "{:<20} {:<8} {:<10} {:<40} {:<31} OWNER",
                "ID", "PID", "STATUS", "BUNDLE", "CREATED"
            );
            for d in &docs {
                println!(
                    "{:<20} {:<8} {:<10} {:<40} {:<31} {}",
                    d["id"].as_str().unwrap_or_default(),
                    d["pid"].as_i64().unwrap_or_default(),
                    d["status"].as_str().unwrap_or_default(),
                    d["bundle"].as_str().unwrap_or_default(),
                    d["created"].as_str().unwrap_or_default(),
                    d["owner"].as_str().unwrap_or_default(),
                );
            }
        }
        other => bail!("invalid format {other:?}: expected table or json"),
    }
    Ok(())
}

fn pause_resume(g: &GlobalOpts, id: &str, pause: bool) -> Result<()> {
    let store = StateStore::new(&g.root);
    let lock = store.lock(id)?;
    let st = store.load(&lock)?;
    let status = st.effective_status();
    match (pause, status) {
        (true, Status::Running) | (false, Status::Paused) => {}
        (true, other) => bail!("cannot pause container {id:?}: it is {other}"),
        (false, other) => bail!("cannot resume container {id:?}: it is {other}, not paused"),
    }
    agent::block_on(async {
        let client = agent::connect(&store, id).await?;
        if pause {
            client
                .pause_container(&st.agent_id)
                .await
                .with_context(|| format!("pausing {id}"))
        } else {
            client
                .resume_container(&st.agent_id)
                .await
                .with_context(|| format!("resuming {id}"))
        }
    })??;
    drop(lock);
    lifecycle::set_status(
        &store,
        id,
        if pause {
            Status::Paused
        } else {
            Status::Running
        },
    )
}

pub fn pause(g: &GlobalOpts, id: &str) -> Result<()> {
    pause_resume(g, id, true)
}

pub fn resume(g: &GlobalOpts, id: &str) -> Result<()> {
    pause_resume(g, id, false)
}

/// Parses a Go-style duration: 500ms, 5s, 1m, 1h, or plain seconds.
pub fn parse_interval(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("invalid interval {s:?}: expected e.g. 5s, 500ms, 1m"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => bail!("invalid interval {s:?}: unknown unit {unit:?} (ms, s, m, h)"),
    };
    if secs.is_nan() || secs <= 0.0 || !secs.is_finite() {
        bail!("invalid interval {s:?}: must be positive");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// runc's stats event data (libcontainer/intelrdt-free subset) from the agent's stats.
fn stats_json(s: &StatsContainerResponse) -> Value {
    let mut data = Map::new();
    if let Some(cpu) = s.cpu.as_ref() {
        data.insert(
            "cpu".into(),
            json!({
                "usage": {
                    "total": cpu.usage_usec * 1000,
                    "kernel": cpu.system_usec * 1000,
                    "user": cpu.user_usec * 1000,
                },
                "throttling": {
                    "periods": cpu.nr_periods,
                    "throttledPeriods": cpu.nr_throttled,
                    "throttledTime": cpu.throttled_usec * 1000,
                },
            }),
        );
    }
    if let Some(m) = s.memory.as_ref() {
        data.insert(
            "memory".into(),
            json!({
                "usage": {"usage": m.usage_bytes, "limit": m.limit_bytes},
                "swap": {"usage": m.swap_usage_bytes, "limit": m.swap_limit_bytes},
                "raw": m.stat,
            }),
        );
    }
    if let Some(p) = s.pids.as_ref() {
        data.insert(
            "pids".into(),
            json!({"current": p.current, "limit": p.limit}),
        );
    }
    if !s.io.is_empty() {
        let entries: Vec<Value> = s
            .io
            .iter()
            .flat_map(|d| {
                [
                    json!({"major": d.major, "minor": d.minor, "op": "Read", "value": d.read_bytes}),
                    json!({"major": d.major, "minor": d.minor, "op": "Write", "value": d.write_bytes}),
                ]
            })
            .collect();
        data.insert("blkio".into(), json!({"ioServiceBytesRecursive": entries}));
    }
    Value::Object(data)
}

pub fn events(g: &GlobalOpts, id: &str, once: bool, interval: &str) -> Result<()> {
    let every = parse_interval(interval)?;
    let store = StateStore::new(&g.root);
    let st = store.load_unlocked(id)?;
    if st.effective_status() == Status::Stopped {
        bail!("container {id:?} is not running");
    }
    agent::block_on(async {
        let client = agent::connect(&store, id).await?;
        let stats_event = |s: &StatsContainerResponse| {
            json!({"type": "stats", "id": id, "data": stats_json(s)}).to_string()
        };
        if once {
            let s = client
                .stats_container(&st.agent_id)
                .await
                .with_context(|| format!("stats of {id}"))?;
            println!("{}", stats_event(&s));
            return anyhow::Ok(());
        }
        let oom_client = client.clone();
        let (oom_tx, mut oom_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(cid) = oom_client.get_oom_event().await {
                if oom_tx.send(cid).is_err() {
                    break;
                }
            }
        });
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if store.load_unlocked(id).map(|s| s.effective_status() == Status::Stopped).unwrap_or(true) {
                        return Ok(());
                    }
                    match client.stats_container(&st.agent_id).await {
                        Ok(s) => println!("{}", stats_event(&s)),
                        Err(e) => tracing::warn!("stats: {e}"),
                    }
                }
                Some(_) = oom_rx.recv() => {
                    println!("{}", json!({"type": "oom", "id": id}));
                }
            }
        }
    })?
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// linux.resources JSON file ("-" for stdin); the flags below override it.
    #[arg(short = 'r', long)]
    pub resources: Option<PathBuf>,
    #[arg(long)]
    pub blkio_weight: Option<u64>,
    #[arg(long)]
    pub cpu_period: Option<u64>,
    #[arg(long)]
    pub cpu_quota: Option<i64>,
    #[arg(long)]
    pub cpu_share: Option<u64>,
    #[arg(long)]
    pub cpuset_cpus: Option<String>,
    #[arg(long)]
    pub cpuset_mems: Option<String>,
    /// Memory limit in bytes (suffixes k, m, g accepted).
    #[arg(long)]
    pub memory: Option<String>,
    #[arg(long)]
    pub memory_reservation: Option<String>,
    #[arg(long)]
    pub memory_swap: Option<String>,
    #[arg(long)]
    pub pids_limit: Option<i64>,
    pub id: String,
}

/// Bytes with an optional k/m/g suffix; -1 means unlimited.
pub fn parse_bytes(s: &str) -> Result<i64> {
    let t = s.trim().to_ascii_lowercase();
    if t == "-1" {
        return Ok(-1);
    }
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mul) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1i64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: i64 = num
        .parse()
        .with_context(|| format!("invalid size {s:?}: expected bytes, or k/m/g"))?;
    n.checked_mul(mul)
        .with_context(|| format!("size {s:?} is too large"))
}

fn resources_json(a: &UpdateArgs) -> Result<Value> {
    let mut r: Value = match &a.resources {
        Some(p) => {
            let text = if p == Path::new("-") {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .context("reading resources from stdin")?;
                s
            } else {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
            };
            serde_json::from_str(&text).context("resources: invalid JSON")?
        }
        None => json!({}),
    };
    let set = |r: &mut Value, section: &str, key: &str, v: Value| {
        if !r[section].is_object() {
            r[section] = json!({});
        }
        r[section][key] = v;
    };
    if let Some(v) = a.blkio_weight {
        set(&mut r, "blockIO", "weight", json!(v));
    }
    if let Some(v) = a.cpu_period {
        set(&mut r, "cpu", "period", json!(v));
    }
    if let Some(v) = a.cpu_quota {
        set(&mut r, "cpu", "quota", json!(v));
    }
    if let Some(v) = a.cpu_share {
        set(&mut r, "cpu", "shares", json!(v));
    }
    if let Some(v) = &a.cpuset_cpus {
        set(&mut r, "cpu", "cpus", json!(v));
    }
    if let Some(v) = &a.cpuset_mems {
        set(&mut r, "cpu", "mems", json!(v));
    }
    if let Some(v) = &a.memory {
        set(&mut r, "memory", "limit", json!(parse_bytes(v)?));
    }
    if let Some(v) = &a.memory_reservation {
        set(&mut r, "memory", "reservation", json!(parse_bytes(v)?));
    }
    if let Some(v) = &a.memory_swap {
        set(&mut r, "memory", "swap", json!(parse_bytes(v)?));
    }
    if let Some(v) = a.pids_limit {
        set(&mut r, "pids", "limit", json!(v));
    }
    let _: oci_spec::runtime::LinuxResources = serde_path_to_error::deserialize(&r)
        .map_err(|e| anyhow::anyhow!("resources: field `{}`: {}", e.path(), e.inner()))?;
    Ok(r)
}

pub fn update(g: &GlobalOpts, a: UpdateArgs) -> Result<()> {
    let resources = resources_json(&a)?;
    let store = StateStore::new(&g.root);
    let st = store.load_unlocked(&a.id)?;
    if !matches!(
        st.effective_status(),
        Status::Created | Status::Running | Status::Paused
    ) {
        bail!("container {:?} is not running", a.id);
    }
    if let Some(limit) = resources["memory"]["limit"].as_i64()
        && limit > 0
        && (limit as u64 >> 20) > st.memory_mib
    {
        tracing::warn!(
            "memory limit {} MiB exceeds the VM's {} MiB; the VM is not resized",
            limit >> 20,
            st.memory_mib
        );
    }
    let resp = agent::block_on(async {
        let client = agent::connect(&store, &a.id).await?;
        client
            .update_container(&st.agent_id, resources.to_string().into_bytes())
            .await
            .with_context(|| format!("updating the resources of {}", a.id))
    })??;
    for s in resp.skipped {
        tracing::warn!("not applied: {s}");
    }
    Ok(())
}

pub fn spec(bundle: &Path) -> Result<()> {
    let path = bundle.join(husk_runtime::bundle::CONFIG_FILE);
    if path.exists() {
        bail!("File {} exists. Remove it first", path.display());
    }
    let text = serde_json::to_string_pretty(&husk_runtime::spec_default::default_spec())?;
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_interval("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_interval("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_interval("3").unwrap(), Duration::from_secs(3));
        assert!(parse_interval("0s").is_err());
        assert!(parse_interval("5 parsecs").is_err());
        assert!(parse_interval("").is_err());
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("64m").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("-1").unwrap(), -1);
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn update_flags_build_resources() {
        let a = UpdateArgs {
            resources: None,
            blkio_weight: None,
            cpu_period: Some(100000),
            cpu_quota: Some(50000),
            cpu_share: None,
            cpuset_cpus: None,
            cpuset_mems: None,
            memory: Some("64m".into()),
            memory_reservation: None,
            memory_swap: None,
            pids_limit: Some(10),
            id: "c".into(),
        };
        let r = resources_json(&a).unwrap();
        assert_eq!(r["memory"]["limit"], 64 << 20);
        assert_eq!(r["cpu"]["quota"], 50000);
        assert_eq!(r["pids"]["limit"], 10);
    }
}
