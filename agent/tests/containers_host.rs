//! Container RPCs against a host-mode agent (root needed): real namespaces and mounts on a
//! busybox rootfs. Most output is checked through files the container writes into a
//! bind-mounted host directory; the `stdio_*` tests go through the stdio broker with
//! `husk_protocol::stdio::attach`, as a host would.

mod common;

use std::time::Duration;

use common::{
    AgentProcess, BusyboxRootfs, alive, create_request, exec_request, read_to_end, read_until, sh,
    spec, streams, wait_for_file, with_bind,
};
use husk_protocol::agent::{CreateSandboxRequest, WaitProcessResponse};
use husk_protocol::client::{AgentClient, ClientError};
use husk_protocol::ttrpc::Code;
use serde_json::json;
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(20);

async fn wait(client: &AgentClient, id: &str, exec_id: &str) -> WaitProcessResponse {
    tokio::time::timeout(WAIT, client.wait_process(id, exec_id))
        .await
        .unwrap_or_else(|_| panic!("{id}/{exec_id} did not exit within {WAIT:?}"))
        .expect("WaitProcess")
}

fn code(err: &ClientError) -> Code {
    err.rpc_code()
        .unwrap_or_else(|| panic!("not an RPC status: {err}"))
}

fn message(err: &ClientError) -> String {
    err.rpc_message().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn exit_code_and_kill_signal_are_reported_exactly() {
    let agent = AgentProcess::spawn();
    let client = agent.connect().await;
    let rootfs = BusyboxRootfs::new();

    let resp = client
        .create_container(&create_request(
            "three",
            &sh("exit 3"),
            &rootfs.path(),
            false,
        ))
        .await
        .expect("create");
    assert!(resp.pid > 0);
    client.start_container("three").await.expect("start");
    let exit = wait(&client, "three", "").await;
    assert_eq!((exit.pid, exit.exit_code, exit.signal), (resp.pid, 3, 0));
    assert!(exit.exited_at_unix_ns > 0);
    // A second wait returns the same status at once.
    assert_eq!(wait(&client, "three", "").await.exit_code, 3);

    client
        .create_container(&create_request(
            "killed",
            &spec(&["sleep", "1000"]),
            &rootfs.path(),
            false,
        ))
        .await
        .expect("create");
    client.start_container("killed").await.expect("start");
    client
        .signal_process("killed", "", libc::SIGKILL, false)
        .await
        .expect("signal");
    let exit = wait(&client, "killed", "").await;
    assert_eq!((exit.exit_code, exit.signal), (0, libc::SIGKILL as u32));

    client.remove_container("three").await.expect("remove");
    client.remove_container("killed").await.expect("remove");
}

#[tokio::test]
async fn exec_joins_the_container_and_remove_leaves_nothing() {
    let agent = AgentProcess::spawn();
    let client = agent.connect().await;
    let rootfs = BusyboxRootfs::new();
    let out = rootfs.scratch("out");
    let spec = with_bind(spec(&["sleep", "1000"]), &out, "/out");
    // An overlay rootfs, so the container has mounts in the agent's namespace to clean up.
    let init = client
        .create_container(&create_request("c", &spec, &rootfs.path(), true))
        .await
        .expect("create")
        .pid;
    client.start_container("c").await.expect("start");
    let state = agent.state_dir();
    let state_s = state.to_string_lossy().into_owned();
    assert!(
        agent.mountinfo().contains(&state_s),
        "overlay mounted under {state_s}"
    );

    let exec = client
        .exec_process(&exec_request(
            "c",
            "e1",
            &[
                "sh",
                "-c",
                "tr '\\0' ' ' < /proc/1/cmdline > /out/cmdline; ps -o pid,args > /out/ps; \
                 touch /written; exec sleep 1000",
            ],
        ))
        .await
        .expect("exec")
        .pid;
    let cmdline = wait_for_file(&out.join("cmdline"), WAIT);
    assert_eq!(
        cmdline.trim_end(),
        "sleep 1000",
        "pid 1 in the exec's namespace"
    );
    let ps = wait_for_file(&out.join("ps"), WAIT);
    assert!(
        ps.lines()
            .any(|l| l.split_whitespace().next() == Some("1") && l.contains("sleep 1000")),
        "{ps}"
    );
    // The overlay takes the container's writes; the image directory stays clean.
    assert!(!rootfs.path().join("written").exists());

    let pids = client.list_processes("c").await.expect("list");
    assert!(
        pids.contains(&init) && pids.contains(&exec),
        "{pids:?} lacks {init}/{exec}"
    );

    let dup = client
        .exec_process(&exec_request("c", "e1", &["true"]))
        .await
        .expect_err("duplicate exec id");
    assert_eq!(code(&dup), Code::ALREADY_EXISTS, "{dup}");

    client
        .signal_process("c", "", libc::SIGKILL, true)
        .await
        .expect("signal all");
    assert_eq!(wait(&client, "c", "").await.signal, libc::SIGKILL as u32);
    assert_eq!(wait(&client, "c", "e1").await.signal, libc::SIGKILL as u32);

    client.remove_container("c").await.expect("remove");
    assert!(!alive(init) && !alive(exec));
    let mounts = agent.mountinfo();
    assert!(
        !mounts.contains(&state_s),
        "mounts left under {state_s}:\n{mounts}"
    );
    assert!(!state.join("containers/c").exists(), "bundle dir left");
    let err = client.list_processes("c").await.expect_err("removed");
    assert_eq!(code(&err), Code::NOT_FOUND);
}

#[tokio::test]
async fn ids_specs_and_rootfs_errors() {
    let agent = AgentProcess::spawn();
    let client = agent.connect().await;
    let rootfs = BusyboxRootfs::new();

    let first = client
        .create_container(&create_request(
            "dup",
            &spec(&["sleep", "1000"]),
            &rootfs.path(),
            false,
        ))
        .await
        .expect("create")
        .pid;
    let err = client
        .create_container(&create_request(
            "dup",
            &spec(&["sleep", "1000"]),
            &rootfs.path(),
            false,
        ))
        .await
        .expect_err("duplicate");
    assert_eq!(code(&err), Code::ALREADY_EXISTS, "{err}");
    assert!(message(&err).contains("container dup"), "{err}");
    // Nothing was created for the duplicate: the first container is untouched.
    client
        .start_container("dup")
        .await
        .expect("first still startable");
    assert_eq!(
        client.list_processes("dup").await.expect("list"),
        vec![first]
    );

    for err in [
        client.start_container("nope").await.expect_err("start"),
        client
            .signal_process("nope", "", 15, false)
            .await
            .expect_err("signal"),
        client
            .wait_process("nope", "")
            .await
            .map(drop)
            .expect_err("wait"),
        client.remove_container("nope").await.expect_err("remove"),
        client
            .list_processes("nope")
            .await
            .map(drop)
            .expect_err("list"),
        client
            .wait_process("dup", "nope")
            .await
            .map(drop)
            .expect_err("wait exec"),
    ] {
        assert_eq!(code(&err), Code::NOT_FOUND, "{err}");
        assert!(message(&err).contains("nope"), "{err}");
    }

    let mut bad = spec(&["true"]);
    bad["process"]["user"]["uid"] = json!("root");
    let err = client
        .create_container(&create_request("bad", &bad, &rootfs.path(), false))
        .await
        .expect_err("malformed spec");
    assert_eq!(code(&err), Code::INVALID_ARGUMENT, "{err}");
    assert!(message(&err).contains("process.user.uid"), "{err}");

    let mut req = create_request("bad", &spec(&["true"]), &rootfs.path(), false);
    req.oci_spec_json = b"{not json".to_vec();
    let err = client.create_container(&req).await.expect_err("not JSON");
    assert_eq!(code(&err), Code::INVALID_ARGUMENT, "{err}");

    let missing = rootfs.path().join("does-not-exist");
    let err = client
        .create_container(&create_request(
            "norootfs",
            &spec(&["true"]),
            &missing,
            false,
        ))
        .await
        .expect_err("missing rootfs");
    assert_eq!(code(&err), Code::NOT_FOUND, "{err}");
    assert!(message(&err).contains("does-not-exist"), "{err}");
    // A failed create releases the id.
    client
        .create_container(&create_request(
            "norootfs",
            &sh("exit 0"),
            &rootfs.path(),
            false,
        ))
        .await
        .expect("id free again");

    // Resources need a cgroup; this host (cgroup v1) has no cgroup2 for host mode.
    if !std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(" /sys/fs/cgroup ") && l.contains(" - cgroup2 "))
    {
        let mut limited = spec(&["true"]);
        limited["linux"]["resources"] = json!({"memory": {"limit": 67108864}});
        let err = client
            .create_container(&create_request("limited", &limited, &rootfs.path(), false))
            .await
            .expect_err("no cgroup2");
        assert_eq!(code(&err), Code::FAILED_PRECONDITION, "{err}");
        assert!(message(&err).contains("memory"), "{err}");
        let err = client.pause_container("dup").await.expect_err("no cgroup");
        assert_eq!(code(&err), Code::FAILED_PRECONDITION, "{err}");
    }

    let err = client
        .signal_process("dup", "", 0x1000, false)
        .await
        .expect_err("bad signal");
    assert_eq!(code(&err), Code::INVALID_ARGUMENT, "{err}");

    let dup_pids = client.list_processes("dup").await.expect("list");
    client.remove_container("dup").await.expect("remove");
    client.remove_container("norootfs").await.expect("remove");
    assert!(dup_pids.iter().all(|p| !alive(*p)));
}

#[tokio::test]
async fn mount_escaping_through_a_symlink_is_refused() {
    let agent = AgentProcess::spawn();
    let client = agent.connect().await;
    let rootfs = BusyboxRootfs::new();
    std::os::unix::fs::symlink("../../../../../../../../..", rootfs.path().join("up"))
        .expect("symlink");
    let mut s = sh("true");
    s["mounts"]
        .as_array_mut()
        .expect("mounts")
        .push(json!({"destination": "/up/tmp/husk-escape", "type": "tmpfs", "source": "tmpfs"}));
    let err = client
        .create_container(&create_request("escape", &s, &rootfs.path(), false))
        .await
        .expect_err("escape refused");
    assert!(
        message(&err).contains("escapes the container rootfs"),
        "{err}"
    );
    assert_eq!(code(&err), Code::INVALID_ARGUMENT, "{err}");
    assert!(!std::path::Path::new("/tmp/husk-escape").exists());
    let err = client
        .list_processes("escape")
        .await
        .expect_err("not created");
    assert_eq!(code(&err), Code::NOT_FOUND);
}

#[tokio::test]
async fn containers_share_a_net_namespace_by_path() {
    let agent = AgentProcess::spawn();
    let client = agent.connect().await;
    let rootfs = BusyboxRootfs::new();
    let mut first = spec(&["sleep", "1000"]);
    first["linux"]["namespaces"]
        .as_array_mut()
        .expect("namespaces")
        .push(json!({"type": "network"}));
    let pid1 = client
        .create_container(&create_request("net1", &first, &rootfs.path(), false))
        .await
        .expect("create net1")
        .pid;
    let mut second = spec(&["sleep", "1000"]);
    second["linux"]["namespaces"]
        .as_array_mut()
        .expect("namespaces")
        .push(json!({"type": "network", "path": format!("/proc/{pid1}/ns/net")}));
    let pid2 = client
        .create_container(&create_request("net2", &second, &rootfs.path(), false))
        .await
        .expect("create net2")
        .pid;
    let ns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("ns link");
    assert_eq!(ns(pid1), ns(pid2));
    assert_ne!(
        ns(pid1),
        std::fs::read_link("/proc/self/ns/net").expect("own ns")
    );
    client.remove_container("net2").await.expect("remove");
    client.remove_container("net1").await.expect("remove");
}

#[tokio::test]
async fn sandbox_resolv_conf_reaches_containers_and_destroy_removes_everything() {
    let mut agent = AgentProcess::spawn();
    let client = agent.connect().await;
    let rootfs = BusyboxRootfs::new();
    let out = rootfs.scratch("out");

    let mut sysctl = CreateSandboxRequest::new();
    sysctl
        .sysctls
        .insert("net.ipv4.ip_forward".into(), "1".into());
    // Refused whole: nothing of it applied, so the real CreateSandbox below still works.
    let err = client
        .create_sandbox(&sysctl)
        .await
        .expect_err("sysctl in host mode");
    assert_eq!(code(&err), Code::FAILED_PRECONDITION, "{err}");

    let mut sb = CreateSandboxRequest::new();
    sb.hostname = "pod".into();
    sb.dns_servers = vec!["10.0.0.53".into()];
    sb.dns_search = vec!["svc.local".into()];
    let mut m = husk_protocol::agent::SandboxMount::new();
    m.name = "shm".into();
    m.source = "shm".into();
    m.fstype = "tmpfs".into();
    m.options = vec!["nosuid".into(), "size=1m".into()];
    sb.mounts = vec![m];
    let dir = client
        .create_sandbox(&sb)
        .await
        .expect("sandbox")
        .sandbox_dir;
    assert!(agent.mountinfo().contains(&format!("{dir}/mounts/shm")));
    let again = client.create_sandbox(&sb).await.expect_err("twice");
    assert_eq!(code(&again), Code::ALREADY_EXISTS, "{again}");

    let mut s = with_bind(
        sh("cat /etc/resolv.conf > /out/resolv; touch /shm/x && echo ok > /out/shm; sleep 1000"),
        &out,
        "/out",
    );
    let mounts = s["mounts"].as_array_mut().expect("mounts");
    mounts.push(json!({"destination": "/etc/resolv.conf", "source": "sandbox://resolv.conf"}));
    mounts.push(json!({"destination": "/shm", "source": "sandbox://mounts/shm"}));
    let pid = client
        .create_container(&create_request("dns", &s, &rootfs.path(), true))
        .await
        .expect("create")
        .pid;
    client.start_container("dns").await.expect("start");
    let resolv = wait_for_file(&out.join("resolv"), WAIT);
    assert_eq!(resolv, "nameserver 10.0.0.53\nsearch svc.local\n");
    assert_eq!(wait_for_file(&out.join("shm"), WAIT), "ok\n");
    assert!(std::path::Path::new(&dir).join("mounts/shm/x").exists());

    let mut bad = sh("true");
    bad["mounts"]
        .as_array_mut()
        .expect("mounts")
        .push(json!({"destination": "/x", "source": "sandbox://../../etc"}));
    let err = client
        .create_container(&create_request("badsrc", &bad, &rootfs.path(), false))
        .await
        .expect_err("sandbox source escaping");
    assert_eq!(code(&err), Code::INVALID_ARGUMENT, "{err}");

    client.destroy_sandbox().await.expect("destroy");
    assert!(agent.wait_exit(WAIT).success());
    assert!(!alive(pid), "container init {pid} survived DestroySandbox");
    assert!(!agent.state_dir().exists(), "state dir left");
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!host_mounts.contains(&agent.state_dir().to_string_lossy().into_owned()));
}

// ---------- stdio through the broker ----------

#[tokio::test]
async fn stdio_stdout_and_stderr_are_separate_and_exact() {
    let agent = AgentProcess::spawn();
    let client = agent.connect().await;
    let rootfs = BusyboxRootfs::new();
    let mut req = create_request(
        "split",
        &sh("echo out; echo err >&2; exit 7"),
        &rootfs.path(),
        false,
    );
    req.stdio = Some(streams("", "split-out", "split-err", "")).into();
    client.create_container(&req).await.expect("create");
    let mut out = agent.attach("split-out").await;
    let mut err = agent.attach("split-err").await;
    client.start_container("split").await.expect("start");
    assert_eq!(read_to_end(&mut out, WAIT).await, b"out\n");
    assert_eq!(read_to_end(&mut err, WAIT).await, b"err\n");
    assert_eq!(wait(&client, "split", "").await.exit_code, 7);
    client.remove_container("split").await.expect("remove");
}

#[tokio::test]
async fn stdio_stdin_reaches_cat_and_host_shutdown_ends_it() {
    let agent = AgentProcess::spawn();
    let client = agent.connect().await;
    let rootfs = BusyboxRootfs::new();
    let mut req = create_request("cat", &spec(&["cat"]), &rootfs.path(), false);
    req.stdio = Some(streams("cat-in", "cat-out", "", "")).into();
    client.create_container(&req).await.expect("create");
    let mut stdin = agent.attach("cat-in").await;
    let mut stdout = agent.attach("cat-out").await;
    client.start_container("cat").await.expect("start");

    // One round trip first: cat is really reading the stream, not a buffer at exit.
    stdin.write_all(b"ping\n").await.expect("write");
    let mut seen = Vec::new();
    read_until(&mut stdout, &mut seen, "ping\n", WAIT).await;
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    stdin.write_all(&payload).await.expect("write");
    stdin.shutdown().await.expect("shutdown(Write)");
    seen.extend(read_to_end(&mut stdout, WAIT).await);
    assert_eq!(seen.len(), 5 + payload.len());
    assert!(
        seen[5..] == payload[..],
        "cat's output differs from its input"
    );
    let exit = wait(&client, "cat", "").await;
    assert_eq!((exit.exit_code, exit.signal), (0, 0));
    client.remove_container("cat").await.expect("remove");
}

#[tokio::test]
async fn stdio_output_written_before_attach_is_kept() {
    let agent = AgentProcess::spawn();
    let client = agent.connect().await;
    let rootfs = BusyboxRootfs::new();
    // ~229 KB: more than a default 64 KiB pipe holds, less than the broker's 1 MiB pipe.
    let mut req = create_request(
        "early",
        &spec(&["seq", "1", "40000"]),
        &rootfs.path(),
        false,
    );
    req.stdio = Some(streams("", "early-out", "", "")).into();
    client.create_container(&req).await.expect("create");
    client.start_container("early").await.expect("start");
    // The process exits without anyone reading its output.
    let exit = wait(&client, "early", "").await;
    assert_eq!((exit.exit_code, exit.signal), (0, 0));

    let mut out = agent.attach("early-out").await;
    let got = read_to_end(&mut out, WAIT).await;
    let expected: String = (1..=40000).map(|i| format!("{i}\n")).collect();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected.as_bytes(), "output differs from seq's");
    // A stream that ended is forgotten.
    let err = agent
        .try_attach("early-out")
        .await
        .expect_err("attached twice");
    assert!(err.to_string().contains("unknown stream id"), "{err}");
    client.remove_container("early").await.expect("remove");
}

#[tokio::test]
async fn stdio_close_stdin_rpc_ends_cat_without_an_attached_stdin() {
    let agent = AgentProcess::spawn();
    let client = agent.connect().await;
    let rootfs = BusyboxRootfs::new();
    let mut req = create_request("closed", &spec(&["cat"]), &rootfs.path(), false);
    req.stdio = Some(streams("closed-in", "closed-out", "", "")).into();
    client.create_container(&req).await.expect("create");
    let mut out = agent.attach("closed-out").await;
    client.start_container("closed").await.expect("start");
    // cat is blocked reading the never-attached stdin pipe.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(alive(
        client.list_processes("closed").await.expect("list")[0]
    ));
    client.close_stdin("closed", "").await.expect("CloseStdin");
    let exit = wait(&client, "closed", "").await;
    assert_eq!((exit.exit_code, exit.signal), (0, 0));
    assert_eq!(read_to_end(&mut out, WAIT).await, b"");
    let err = agent
        .try_attach("closed-in")
        .await
        .expect_err("stdin closed");
    assert!(err.to_string().contains("stdin already closed"), "{err}");

    // A process without a stdin stream has nothing to close.
    let mut req = create_request("nostdin", &spec(&["true"]), &rootfs.path(), false);
    req.stdio = Some(streams("", "nostdin-out", "", "")).into();
    client.create_container(&req).await.expect("create");
    let err = client
        .close_stdin("nostdin", "")
        .await
        .expect_err("no stdin");
    assert_eq!(code(&err), Code::FAILED_PRECONDITION, "{err}");
    client.remove_container("nostdin").await.expect("remove");
    // Removing a container releases its never-attached streams.
    let err = agent.try_attach("nostdin-out").await.expect_err("released");
    assert!(err.to_string().contains("unknown stream id"), "{err}");
    client.remove_container("closed").await.expect("remove");
}

#[tokio::test]
async fn stdio_of_an_exec_and_reuse_of_ids_after_a_failed_exec() {
    let agent = AgentProcess::spawn();
    let client = agent.connect().await;
    let rootfs = BusyboxRootfs::new();
    client
        .create_container(&create_request(
            "host",
            &spec(&["sleep", "1000"]),
            &rootfs.path(),
            false,
        ))
        .await
        .expect("create");
    client.start_container("host").await.expect("start");

    // A failing exec (no such program) must not keep its stream ids.
    let mut bad = exec_request("host", "bad", &["/no/such/program"]);
    bad.stdio = Some(streams("", "exec-out", "", "")).into();
    client
        .exec_process(&bad)
        .await
        .expect_err("exec of nothing");

    let mut req = exec_request(
        "host",
        "e1",
        &["sh", "-c", "echo from exec $(hostname); exit 5"],
    );
    req.stdio = Some(streams("", "exec-out", "", "")).into();
    client
        .exec_process(&req)
        .await
        .expect("exec, same stream id");
    let mut out = agent.attach("exec-out").await;
    assert_eq!(read_to_end(&mut out, WAIT).await, b"from exec box\n");
    assert_eq!(wait(&client, "host", "e1").await.exit_code, 5);

    client
        .signal_process("host", "", libc::SIGKILL, false)
        .await
        .expect("kill");
    wait(&client, "host", "").await;
    client.remove_container("host").await.expect("remove");
}

#[tokio::test]
async fn stdio_terminal_is_a_pty_and_resize_reaches_it() {
    let agent = AgentProcess::spawn();
    let client = agent.connect().await;
    let rootfs = BusyboxRootfs::new();
    // As with runc, the pty comes from the container's own devpts (OCI specs mount one)
    // and is bound at /dev/console; an exec'd process gets the next one.
    let mut s = sh(
        "tty; test /dev/console -ef /dev/pts/0 && echo console-ok; stty size; read line; echo got $line; stty size; exit 3",
    );
    s["mounts"].as_array_mut().expect("mounts").push(json!({
        "destination": "/dev/pts", "type": "devpts", "source": "devpts",
        "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
    }));
    s["process"]["terminal"] = json!(true);
    let mut req = create_request("tty", &s, &rootfs.path(), false);
    req.terminal = true;
    req.stdio = Some(streams("", "", "", "tty-term")).into();
    client.create_container(&req).await.expect("create");
    client
        .tty_win_resize("tty", "", 24, 80)
        .await
        .expect("resize");
    let mut term = agent.attach("tty-term").await;
    client.start_container("tty").await.expect("start");

    let mut seen = Vec::new();
    read_until(&mut term, &mut seen, "24 80", WAIT).await;
    let text = String::from_utf8_lossy(&seen).into_owned();
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    assert_eq!(lines[..2], ["/dev/pts/0", "console-ok"], "{text:?}");

    let mut req = exec_request("tty", "e-tty", &["tty"]);
    let mut process: serde_json::Value =
        serde_json::from_slice(&req.process_json).expect("process json");
    process["terminal"] = json!(true);
    req.process_json = process.to_string().into_bytes();
    req.terminal = true;
    req.stdio = Some(streams("", "", "", "e-tty-term")).into();
    client
        .exec_process(&req)
        .await
        .expect("exec with a terminal");
    let mut exec_term = agent.attach("e-tty-term").await;
    let out = read_to_end(&mut exec_term, WAIT).await;
    assert_eq!(String::from_utf8_lossy(&out), "/dev/pts/1\r\n");
    assert_eq!(wait(&client, "tty", "e-tty").await.exit_code, 0);

    client
        .tty_win_resize("tty", "", 40, 100)
        .await
        .expect("resize");
    term.write_all(b"hello\n").await.expect("write");
    let rest = read_to_end(&mut term, WAIT).await;
    let rest = String::from_utf8_lossy(&rest).replace('\r', "");
    // The terminal echoes the input line, then the script's output follows.
    assert!(rest.contains("got hello\n40 100\n"), "{rest:?}");
    let exit = wait(&client, "tty", "").await;
    assert_eq!((exit.exit_code, exit.signal), (3, 0));

    let err = client
        .tty_win_resize("tty", "", 1 << 16, 80)
        .await
        .expect_err("rows too big");
    assert_eq!(code(&err), Code::INVALID_ARGUMENT, "{err}");
    client.remove_container("tty").await.expect("remove");
}

#[tokio::test]
async fn repeated_execs_stream_their_output_and_exit_codes() {
    let agent = AgentProcess::spawn();
    let client = agent.connect().await;
    let rootfs = BusyboxRootfs::new();
    let init = client
        .create_container(&create_request(
            "rep",
            &spec(&["sleep", "1000"]),
            &rootfs.path(),
            false,
        ))
        .await
        .expect("create")
        .pid;
    client.start_container("rep").await.expect("start");
    for round in 0..4 {
        let exec_id = format!("x{round}");
        let out_id = format!("x{round}-out");
        let mut req = exec_request(
            "rep",
            &exec_id,
            &["sh", "-c", "echo pid1=$(cat /proc/1/comm); sleep 1; exit 7"],
        );
        req.stdio = Some(streams("", &out_id, "", "")).into();
        let pid = client.exec_process(&req).await.expect("exec").pid;
        let mut out = agent.attach(&out_id).await;
        let pids = client.list_processes("rep").await.expect("list");
        assert!(
            pids.contains(&init) && pids.contains(&pid),
            "round {round}: {pids:?}"
        );
        let text = read_to_end(&mut out, WAIT).await;
        assert_eq!(
            String::from_utf8_lossy(&text),
            "pid1=sleep\n",
            "round {round}"
        );
        let exit = wait(&client, "rep", &exec_id).await;
        assert_eq!((exit.exit_code, exit.signal), (7, 0), "round {round}");
        assert_eq!(
            client.list_processes("rep").await.expect("list"),
            vec![init],
            "round {round}"
        );
    }
    client
        .signal_process("rep", "", libc::SIGKILL, false)
        .await
        .expect("kill");
    wait(&client, "rep", "").await;
    client.remove_container("rep").await.expect("remove");
}
