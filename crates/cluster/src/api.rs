//! `ferryd`'s REST API (JSON over HTTP, `Authorization: Bearer <token>` on everything but
//! `/metrics` and `/v1/health`), described in `docs/openapi.yaml`. Any host answers for the
//! whole cluster: requests become records in the store, which the owning host and the
//! coordinator act on.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use vmm::config::{parse_mib, validate_name};
use vmm::VmConfig;

use crate::agent::Agent;
use crate::history::Throughput;
use crate::records::*;
use crate::view::{baseline, View};
use crate::ClusterError;

mod power;
mod reports;

/// An API error: status and message, sent as `{"error": "..."}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Request(code, msg) => ApiError(
                StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
                msg,
            ),
            ClusterError::Store(e) => ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            e => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

impl From<ferry_store::StoreError> for ApiError {
    fn from(e: ferry_store::StoreError) -> Self {
        ClusterError::Store(e).into()
    }
}

fn bad(code: u16, msg: impl Into<String>) -> ApiError {
    ApiError(
        StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
        msg.into(),
    )
}

type ApiResult = Result<Json<Value>, ApiError>;
type Shared = State<Arc<Agent>>;

/// JSON bodies: a malformed one is a 400 with serde's words, not axum's default text.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| bad(400, e.to_string()))?;
        let text = if bytes.is_empty() {
            &b"{}"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(text)
            .map(Body)
            .map_err(|e| bad(400, format!("bad request body: {e}")))
    }
}

/// The API's routes.
pub fn router(agent: Arc<Agent>) -> Router {
    let authed = Router::new()
        .route("/v1/cluster", get(cluster))
        .route("/v1/hosts", get(hosts))
        .route("/v1/hosts/{host}", get(host))
        .route("/v1/hosts/{host}/drain", post(drain))
        .route("/v1/hosts/{host}/resume", post(resume))
        .route("/v1/hosts/{host}/standby", post(power::standby))
        .route("/v1/hosts/{host}/wake", post(power::wake))
        .route("/v1/vms", get(vms).post(create_vm))
        .route("/v1/vms/{name}", get(vm).delete(delete_vm))
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/migrate", post(migrate_vm))
        .route("/v1/vms/{name}/cpu", post(set_cpu))
        .route("/v1/vms/{name}/disks", get(list_disks).post(add_disk))
        .route("/v1/vms/{name}/disks/{lun}", delete(remove_disk))
        .route("/v1/internal/vms/{name}/disks", post(add_disk_here))
        .route(
            "/v1/internal/vms/{name}/disks/{lun}",
            delete(remove_disk_here),
        )
        .route("/v1/cpu-baseline", get(cpu_baseline))
        .route("/v1/cluster/balance", get(get_balance).post(set_balance))
        .route(
            "/v1/cluster/power",
            get(power::get_power).post(power::set_power),
        )
        .route("/v1/cluster/recommendations", get(recommendations))
        .route(
            "/v1/cluster/recommendations/{vm}/apply",
            post(apply_recommendation),
        )
        .route("/v1/reports/utilization", get(reports::utilization))
        .route("/v1/reports/placement/{vm}", get(reports::placement))
        .route("/v1/reports/migrations", get(reports::migrations))
        .route(
            "/v1/internal/utilization",
            get(reports::internal_utilization),
        )
        .route("/v1/migrations", get(migrations))
        .route("/v1/migrations/{id}", get(migration))
        .route("/v1/migrations/{id}/cancel", post(cancel_migration))
        .route("/v1/internal/receive", post(internal_receive))
        .route_layer(middleware::from_fn_with_state(agent.clone(), auth));
    Router::new()
        .route("/v1/health", get(|| async { Json(json!({"ok": true})) }))
        .route("/metrics", get(metrics))
        .merge(authed)
        .with_state(agent)
}

async fn auth(State(a): Shared, headers: HeaderMap, req: Request, next: Next) -> Response {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), a.token.as_bytes()) => next.run(req).await,
        Some(_) => bad(401, "wrong API token").into_response(),
        None => bad(401, "missing API token (Authorization: Bearer ...)").into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// A VM as the API shows it: its record, where it runs, and its active migration.
async fn vm_view(a: &Agent, v: &VmRecord, view: &View) -> Result<Value, ClusterError> {
    let running: Vec<RunningRecord> =
        a.db.list::<RunningRecord>(&running_prefix(Some(&v.config.name)))
            .await?
            .into_iter()
            .map(|(_, _, r)| r)
            .collect();
    let state = match running.iter().find(|r| Some(&r.host) == v.owner.as_ref()) {
        Some(r) => r.state.clone(),
        None if v.desired == Desired::Stopped => "stopped".into(),
        None if v.owner.is_some() => "starting".into(),
        None => "pending".into(),
    };
    Ok(json!({
        "name": v.config.name,
        "state": state,
        "desired": v.desired,
        "host": v.owner,
        "epoch": v.epoch,
        "ha": v.ha,
        "vcpus": v.config.vcpus,
        "memory_mib": v.config.memory_mib,
        "disks": v.config.disks,
        "nics": v.config.nics,
        "scsi": v.config.scsi,
        "cpu_model": if v.cluster_cpu { "cluster" } else { v.config.cpu.name() },
        "cpu_features": running.iter().find(|r| Some(&r.host) == v.owner.as_ref()).map(|r| r.cpu_features.clone()),
        "running_on": running,
        "note": v.note,
        "migration": view.active_migration(&v.config.name).map(to_json),
        "console_log": a.console_log(&v.config.name),
    }))
}

async fn cluster(State(a): Shared) -> ApiResult {
    let view = View::read(&a.db).await?;
    let coord =
        a.db.get::<CoordinatorRecord>(&coordinator_key())
            .await?
            .map(|(_, c)| c.host);
    let count = |s: MigrationState| view.migrations.iter().filter(|m| m.state == s).count();
    Ok(Json(json!({
        "coordinator": coord,
        "hosts": view.hosts.len(),
        "hosts_up": view.hosts.keys().collect::<std::collections::BTreeSet<_>>(),
        "vms": view.vms.len(),
        "vms_running": view.vms.values().filter(|v| v.desired == Desired::Running).count(),
        "migrations_running": count(MigrationState::Running),
        "migrations_queued": count(MigrationState::Queued),
        "max_migrations": view.max_migrations(a.cfg.limits.max_migrations),
        "per_host_migrations": a.cfg.limits.per_host,
    })))
}

fn host_json(h: &HostRecord, adm: Option<&HostAdmin>, view: &View) -> Value {
    let adm = adm.cloned().unwrap_or_default();
    let state = if h.fenced {
        "fenced"
    } else if adm.power != PowerState::On {
        power_state(&adm)
    } else if adm.draining {
        "draining"
    } else if adm.paused {
        "paused"
    } else {
        "up"
    };
    let mut v = to_json(h);
    if let Some(o) = v.as_object_mut() {
        o.insert("state".into(), json!(state));
        o.insert("committed_mib".into(), json!(view.committed_mib(&h.name)));
        if let Some(n) = &adm.power_note {
            o.insert("power_note".into(), json!(n));
        }
    }
    v
}

/// The state word of a host the cluster is switching off or on.
fn power_state(adm: &HostAdmin) -> &'static str {
    match adm.power {
        PowerState::On => "up",
        PowerState::Evacuating => "evacuating",
        PowerState::Standby => "standby",
        PowerState::Wake | PowerState::Waking => "waking",
    }
}

/// A host with no lease: switched off by the cluster (standby), or down.
fn absent_host_json(name: &str, adm: Option<&HostAdmin>) -> Value {
    match adm.filter(|a| a.standing_by()) {
        Some(a) => json!({
            "name": name,
            "state": power_state(a),
            "power_since": a.power_since,
            "power_note": a.power_note,
            "cores": a.capacity.map(|c| c.cores),
            "memory_mib": a.capacity.map(|c| c.memory_mib),
        }),
        None => json!({"name": name, "state": "down"}),
    }
}

async fn hosts(State(a): Shared) -> ApiResult {
    let view = View::read(&a.db).await?;
    let mut names: Vec<String> = view.hosts.keys().cloned().collect();
    // Hosts with an admin record but no lease are down; list them too.
    for h in view.admin.keys() {
        if !view.hosts.contains_key(h) {
            names.push(h.clone());
        }
    }
    names.sort();
    names.dedup();
    let list: Vec<Value> = names
        .iter()
        .map(|n| match view.hosts.get(n) {
            Some(h) => host_json(h, view.admin.get(n), &view),
            None => absent_host_json(n, view.admin.get(n)),
        })
        .collect();
    Ok(Json(json!(list)))
}

async fn host(State(a): Shared, Path(h): Path<String>) -> ApiResult {
    let view = View::read(&a.db).await?;
    match view.hosts.get(&h) {
        Some(r) => Ok(Json(host_json(r, view.admin.get(&h), &view))),
        None if view.admin.contains_key(&h) => Ok(Json(absent_host_json(&h, view.admin.get(&h)))),
        None => Err(bad(404, format!("no host named {h:?} in the cluster"))),
    }
}

async fn drain(State(a): Shared, Path(h): Path<String>) -> ApiResult {
    let view = View::read(&a.db).await?;
    if !view.hosts.contains_key(&h) {
        return Err(bad(404, format!("no live host named {h:?} in the cluster")));
    }
    if let Some(adm) = view.admin.get(&h).filter(|a| a.power != PowerState::On) {
        return Err(bad(
            409,
            format!(
                "{h} is {} (power consolidation); `ferry host resume {h}` keeps it on",
                power_state(adm)
            ),
        ));
    }
    let others = view
        .hosts
        .keys()
        .filter(|n| **n != h && view.accepts(n))
        .count();
    let has_vms = view
        .vms
        .values()
        .any(|v| v.owner.as_deref() == Some(h.as_str()) && v.desired == Desired::Running);
    if others == 0 && has_vms {
        return Err(bad(
            409,
            format!("{h} is the last host that takes VMs: its VMs would have nowhere to go"),
        ));
    }
    let key = admin_key(&h);
    let rec = HostAdmin {
        paused: true,
        draining: true,
        ..Default::default()
    };
    a.db.store.put(&key, encode(&rec)?, None).await?;
    Ok(Json(json!({"host": h, "state": "draining"})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ResumeReq {
    #[serde(default)]
    failback: bool,
}

async fn resume(State(a): Shared, Path(h): Path<String>, Body(req): Body<ResumeReq>) -> ApiResult {
    let view = View::read(&a.db).await?;
    if !view.hosts.contains_key(&h) && !view.admin.contains_key(&h) {
        return Err(bad(404, format!("no host named {h:?} in the cluster")));
    }
    if view.admin.get(&h).is_some_and(|a| a.standing_by()) {
        return Err(bad(
            409,
            format!("{h} is switched off by the cluster (standby): `ferry host wake {h}` switches it on"),
        ));
    }
    a.db.store
        .put(&admin_key(&h), encode(&HostAdmin::default())?, None)
        .await?;
    let mut queued = Vec::new();
    if req.failback {
        // The VMs its last drain moved away that still run where the drain put them.
        let mut seen = std::collections::HashSet::new();
        for m in view.migrations.iter().rev() {
            if m.from != h || m.reason != "drain" || m.state != MigrationState::Succeeded {
                continue;
            }
            if !seen.insert(m.vm.clone()) {
                continue;
            }
            let Some(v) = view.vms.get(&m.vm) else {
                continue;
            };
            if v.owner.as_deref() != Some(m.to.as_str())
                || v.desired != Desired::Running
                || view.active_migration(&m.vm).is_some()
            {
                continue;
            }
            queued.push(to_json(
                &a.db
                    .queue_migration(&m.vm, &m.to, &h, "failback", Default::default(), None)
                    .await?,
            ));
        }
    }
    Ok(Json(json!({"host": h, "state": "up", "failback": queued})))
}

async fn vms(State(a): Shared) -> ApiResult {
    let view = View::read(&a.db).await?;
    let mut names: Vec<&String> = view.vms.keys().collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        out.push(vm_view(&a, &view.vms[n], &view).await?);
    }
    Ok(Json(json!(out)))
}

async fn vm(State(a): Shared, Path(n): Path<String>) -> ApiResult {
    let view = View::read(&a.db).await?;
    let v = view
        .vms
        .get(&n)
        .ok_or_else(|| bad(404, format!("no VM named {n:?} in the cluster")))?;
    Ok(Json(vm_view(&a, v, &view).await?))
}

/// `POST /v1/vms`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVm {
    name: String,
    kernel: std::path::PathBuf,
    #[serde(default)]
    initrd: Option<std::path::PathBuf>,
    #[serde(default)]
    cmdline: String,
    #[serde(default = "default_memory")]
    memory: String,
    #[serde(default = "default_vcpus")]
    vcpus: u8,
    #[serde(default)]
    cpu: Option<String>,
    #[serde(default = "yes")]
    ha: bool,
    #[serde(default = "yes")]
    start: bool,
    /// Disks on the shared storage (virtio-blk, in order).
    #[serde(default)]
    disks: Vec<vmm::config::DiskSpec>,
    /// Network interfaces (virtio-net, in order); an empty `mac` is generated here.
    #[serde(default)]
    nics: Vec<vmm::config::NicSpec>,
    /// A virtio-scsi controller and its first disks (added and removed later while the VM
    /// runs).
    #[serde(default)]
    scsi: Option<vmm::config::ScsiSpec>,
}

/// A CPU model name: one of the VMM's, or `cluster`.
fn parse_cpu(s: Option<&str>) -> Result<(vmm::cpuid::CpuModel, bool), ApiError> {
    match s {
        None => Ok((vmm::cpuid::CpuModel::default(), false)),
        Some("cluster") => Ok((vmm::cpuid::CpuModel::Host, true)),
        Some(c) => vmm::cpuid::CpuModel::parse(c)
            .map(|m| (m, false))
            .map_err(|e| bad(400, format!("{e} (or cluster)"))),
    }
}

fn default_memory() -> String {
    "256M".into()
}
fn default_vcpus() -> u8 {
    1
}
fn yes() -> bool {
    true
}

async fn create_vm(
    State(a): Shared,
    Body(req): Body<CreateVm>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    validate_name(&req.name).map_err(|e| bad(400, e.to_string()))?;
    for p in std::iter::once(&req.kernel).chain(req.initrd.as_ref()) {
        if !p.is_absolute() {
            return Err(bad(
                400,
                format!(
                    "{} must be an absolute path (on the shared storage)",
                    p.display()
                ),
            ));
        }
        std::fs::metadata(p).map_err(|e| bad(400, format!("cannot read {}: {e}", p.display())))?;
    }
    let scsi_paths = req
        .scsi
        .iter()
        .flat_map(|s| s.disks.iter().map(|d| &d.path));
    for p in scsi_paths {
        vmm::disk::inspect(p).map_err(|e| bad(400, e.to_string()))?;
    }
    for d in &req.disks {
        if !d.path.is_absolute() {
            return Err(bad(
                400,
                format!(
                    "disk {} must be an absolute path (on the shared storage)",
                    d.path.display()
                ),
            ));
        }
        vmm::disk::inspect(&d.path).map_err(|e| bad(400, e.to_string()))?;
    }
    let (cpu, cluster_cpu) = parse_cpu(req.cpu.as_deref())?;
    let config = VmConfig {
        name: req.name.clone(),
        vcpus: req.vcpus,
        memory_mib: parse_mib(&req.memory).map_err(|e| bad(400, e.to_string()))?,
        kernel: req.kernel.clone(),
        initrd: req.initrd.clone(),
        cmdline: req.cmdline.clone(),
        cpu,
        cpu_hide: Vec::new(),
        disks: req.disks.clone(),
        nics: req
            .nics
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, mut n)| {
                n.fill_mac(i);
                n
            })
            .collect(),
        scsi: req.scsi.clone(),
    };
    config.validate().map_err(|e| bad(400, e.to_string()))?;
    vmm::boot::detect(&config.kernel).map_err(|e| bad(400, e.to_string()))?;
    let rec = VmRecord {
        config,
        ha: req.ha,
        desired: if req.start {
            Desired::Running
        } else {
            Desired::Stopped
        },
        owner: None,
        epoch: 0,
        note: None,
        cluster_cpu,
    };
    if !a
        .db
        .store
        .compare_and_put(&vm_key(&req.name), 0, encode(&rec)?, None)
        .await?
    {
        return Err(bad(
            409,
            format!("a VM named {:?} already exists", req.name),
        ));
    }
    let view = View::read(&a.db).await?;
    Ok((StatusCode::CREATED, Json(vm_view(&a, &rec, &view).await?)))
}

async fn set_desired(a: &Agent, n: &str, d: Desired) -> ApiResult {
    let view = View::read(&a.db).await?;
    if !view.vms.contains_key(n) {
        return Err(bad(404, format!("no VM named {n:?} in the cluster")));
    }
    if d == Desired::Stopped
        && view
            .active_migration(n)
            .is_some_and(|m| m.state == MigrationState::Running)
    {
        return Err(bad(
            409,
            format!("{n} is migrating; cancel the migration first"),
        ));
    }
    a.db.update::<VmRecord, _>(&vm_key(n), |r| {
        let ch = r.desired != d;
        r.desired = d;
        ch
    })
    .await?;
    Ok(Json(json!({"name": n, "desired": d})))
}

async fn start_vm(State(a): Shared, Path(n): Path<String>) -> ApiResult {
    set_desired(&a, &n, Desired::Running).await
}

async fn stop_vm(State(a): Shared, Path(n): Path<String>) -> ApiResult {
    set_desired(&a, &n, Desired::Stopped).await
}

async fn delete_vm(State(a): Shared, Path(n): Path<String>) -> ApiResult {
    let Some((rev, v)) = a.db.get::<VmRecord>(&vm_key(&n)).await? else {
        return Err(bad(404, format!("no VM named {n:?} in the cluster")));
    };
    if v.desired == Desired::Running {
        return Err(bad(409, format!("{n} should be running; stop it first")));
    }
    let running = a.db.store.list(&running_prefix(Some(&n))).await?;
    if !running.is_empty() {
        return Err(bad(409, format!("{n} is still stopping")));
    }
    if !a.db.store.compare_and_delete(&vm_key(&n), rev).await? {
        return Err(bad(409, format!("{n} changed meanwhile; try again")));
    }
    Ok(Json(json!({"name": n, "deleted": true})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MigrateReq {
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    options: migration::MigrateOptions,
}

async fn migrate_vm(
    State(a): Shared,
    Path(n): Path<String>,
    Body(req): Body<MigrateReq>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let view = View::read(&a.db).await?;
    let v = view
        .vms
        .get(&n)
        .ok_or_else(|| bad(404, format!("no VM named {n:?} in the cluster")))?;
    let Some(from) = v.owner.clone() else {
        return Err(bad(409, format!("{n} is not placed on any host yet")));
    };
    if v.desired != Desired::Running || !view.hosts.contains_key(&from) {
        return Err(bad(
            409,
            format!("{n} is not running (live migration moves running VMs)"),
        ));
    }
    if let Some(m) = view.active_migration(&n) {
        return Err(bad(
            409,
            format!("{n} already has migration {} ({:?})", m.id, m.state),
        ));
    }
    let to = match req.to {
        Some(to) => {
            if to == from {
                return Err(bad(409, format!("{n} is already on {to}")));
            }
            if !view.hosts.contains_key(&to) {
                return Err(bad(
                    404,
                    format!("no live host named {to:?} in the cluster"),
                ));
            }
            if let Some(why) = view.unfit(&to, v, 0) {
                return Err(bad(409, why));
            }
            to
        }
        None => view
            .best_host(v, Some(&from), &Default::default())
            .map_err(|e| bad(409, e))?,
    };
    let max = migration::protocol::MAX_CONNECTIONS;
    if !(1..=max).contains(&req.options.connections) {
        return Err(bad(400, format!("options.connections must be 1 to {max}")));
    }
    let m =
        a.db.queue_migration(&n, &from, &to, "user", req.options, None)
            .await?;
    Ok((StatusCode::ACCEPTED, Json(to_json(&m))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetCpu {
    cpu: String,
}

/// Changes a VM's CPU model: only while it is off, since a running guest has already seen its
/// features.
async fn set_cpu(State(a): Shared, Path(n): Path<String>, Body(req): Body<SetCpu>) -> ApiResult {
    let (cpu, cluster_cpu) = parse_cpu(Some(&req.cpu))?;
    let Some((_, v)) = a.db.get::<VmRecord>(&vm_key(&n)).await? else {
        return Err(bad(404, format!("no VM named {n:?} in the cluster")));
    };
    let running = a.db.store.list(&running_prefix(Some(&n))).await?;
    if v.desired == Desired::Running || !running.is_empty() {
        return Err(bad(
            409,
            format!("{n} is running: its guest has already seen its CPU; stop it first to change the CPU model"),
        ));
    }
    let changed =
        a.db.update::<VmRecord, _>(&vm_key(&n), |r| {
            if r.desired == Desired::Running {
                return false;
            }
            r.config.cpu = cpu;
            r.config.cpu_hide.clear();
            r.cluster_cpu = cluster_cpu;
            true
        })
        .await?;
    if !changed {
        return Err(bad(
            409,
            format!("{n} was started meanwhile; stop it first"),
        ));
    }
    Ok(Json(json!({"name": n, "cpu_model": req.cpu})))
}

/// `GET /v1/vms/{name}/disks`: the disks of the VM's SCSI controller (its record's).
async fn list_disks(State(a): Shared, Path(n): Path<String>) -> ApiResult {
    let luns = a.disk_list(&n).await?;
    Ok(Json(json!({ "luns": luns })))
}

/// `POST /v1/vms/{name}/disks`: adds a disk where the VM runs (or to a stopped VM's record).
async fn add_disk(
    State(a): Shared,
    Path(n): Path<String>,
    Body(req): Body<crate::disks::DiskAdd>,
) -> ApiResult {
    Ok(Json(json!(a.disk_add(&n, req, false).await?)))
}

/// `DELETE /v1/vms/{name}/disks/{lun}`.
async fn remove_disk(State(a): Shared, Path((n, lun)): Path<(String, u16)>) -> ApiResult {
    Ok(Json(json!(a.disk_remove(&n, lun, false).await?)))
}

/// The agent that runs the VM, asked by another.
async fn add_disk_here(
    State(a): Shared,
    Path(n): Path<String>,
    Body(req): Body<crate::disks::DiskAdd>,
) -> ApiResult {
    Ok(Json(json!(a.disk_add(&n, req, true).await?)))
}

async fn remove_disk_here(State(a): Shared, Path((n, lun)): Path<(String, u16)>) -> ApiResult {
    Ok(Json(json!(a.disk_remove(&n, lun, true).await?)))
}

/// The cluster's policy: the store's, or this agent's `[balance]` and `[power]` if none was set.
async fn policy(a: &Agent) -> Result<PolicyRecord, ClusterError> {
    crate::balancing::policy(&a.db, &a.cfg.balance, &a.cfg.power).await
}

/// `GET /v1/cluster/balance`.
async fn get_balance(State(a): Shared) -> ApiResult {
    let p = policy(&a).await?;
    Ok(Json(json!({
        "mode": p.balance,
        "threshold": p.threshold,
        "interval_s": a.cfg.balance.interval_s,
        "cooldown_s": a.cfg.balance.cooldown_s,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetBalance {
    #[serde(default)]
    mode: Option<BalanceMode>,
    #[serde(default)]
    threshold: Option<u8>,
}

/// `POST /v1/cluster/balance`: the mode and threshold for the whole cluster.
async fn set_balance(State(a): Shared, Body(req): Body<SetBalance>) -> ApiResult {
    if let Some(t) = req.threshold.filter(|t| !(1..=5).contains(t)) {
        return Err(bad(
            400,
            format!("threshold {t}: 1 (conservative) to 5 (aggressive)"),
        ));
    }
    let key = policy_key();
    loop {
        let (rev, mut p) = match a.db.get::<PolicyRecord>(&key).await? {
            Some((rev, p)) => (rev, p),
            None => (0, policy(&a).await?),
        };
        p.balance = req.mode.unwrap_or(p.balance);
        p.threshold = req.threshold.unwrap_or(p.threshold);
        if a.db
            .store
            .compare_and_put(&key, rev, encode(&p)?, None)
            .await?
        {
            return Ok(Json(json!({"mode": p.balance, "threshold": p.threshold})));
        }
    }
}

/// `GET /v1/cluster/recommendations`: the coordinator's last balancing pass.
async fn recommendations(State(a): Shared) -> ApiResult {
    let p = policy(&a).await?;
    let r =
        a.db.get::<RecommendationsRecord>(&recommendations_key())
            .await?
            .map(|(_, r)| r)
            .unwrap_or_default();
    let power =
        a.db.get::<PowerAdviceRecord>(&power_advice_key())
            .await?
            .map(|(_, r)| r);
    Ok(Json(json!({
        "mode": p.balance,
        "threshold": p.threshold,
        "at": r.at,
        "imbalance": r.imbalance,
        "target": r.target,
        "moves": r.moves,
        "power_mode": p.power,
        "power": power,
    })))
}

/// `POST /v1/cluster/recommendations/{vm}/apply`: queues the recommended move of `vm`.
async fn apply_recommendation(
    State(a): Shared,
    Path(vm): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Some((_, r)) =
        a.db.get::<RecommendationsRecord>(&recommendations_key())
            .await?
    else {
        return Err(bad(404, "no recommendations yet (is balancing off?)"));
    };
    let Some(m) = r.moves.iter().find(|m| m.vm == vm) else {
        return Err(bad(404, format!("no recommendation for {vm}")));
    };
    let view = View::read(&a.db).await?;
    let Some(v) = view.vms.get(&vm) else {
        return Err(bad(404, format!("no VM named {vm:?} in the cluster")));
    };
    if v.owner.as_deref() != Some(m.from.as_str()) {
        return Err(bad(
            409,
            format!(
                "{vm} is no longer on {}; the recommendation is stale",
                m.from
            ),
        ));
    }
    if let Some(active) = view.active_migration(&vm) {
        return Err(bad(
            409,
            format!(
                "{vm} already has migration {} ({:?})",
                active.id, active.state
            ),
        ));
    }
    if let Some(why) = view.unfit(&m.to, v, 0) {
        return Err(bad(409, why));
    }
    let q =
        a.db.queue_migration(
            &vm,
            &m.from,
            &m.to,
            "balance",
            Default::default(),
            Some(m.reason.clone()),
        )
        .await?;
    Ok((StatusCode::ACCEPTED, Json(to_json(&q))))
}

/// The features every live host offers, and for each feature some host lacks, which hosts
/// lack it (they limit the `cluster` CPU model).
async fn cpu_baseline(State(a): Shared) -> ApiResult {
    let view = View::read(&a.db).await?;
    let (common, limits) = baseline(&view);
    let vendors: std::collections::BTreeSet<&str> =
        view.hosts.values().map(|h| h.cpu_vendor.as_str()).collect();
    Ok(Json(json!({
        "hosts": view.hosts.keys().collect::<std::collections::BTreeSet<_>>(),
        "vendors": vendors,
        "common": common,
        "limited_by": limits,
    })))
}

async fn migrations(State(a): Shared) -> ApiResult {
    let view = View::read(&a.db).await?;
    Ok(Json(to_json(&view.migrations)))
}

fn parse_id(id: &str) -> Result<u64, ApiError> {
    id.parse()
        .map_err(|_| bad(400, format!("bad migration id {id:?}")))
}

async fn migration(State(a): Shared, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    match a.db.get::<MigrationRecord>(&migration_key(id)).await? {
        Some((_, m)) => Ok(Json(to_json(&m))),
        None => Err(bad(404, format!("no migration {id}"))),
    }
}

async fn cancel_migration(State(a): Shared, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    let Some((_, m)) = a.db.get::<MigrationRecord>(&migration_key(id)).await? else {
        return Err(bad(404, format!("no migration {id}")));
    };
    if m.state.done() {
        return Err(bad(
            409,
            format!("migration {id} has already ended ({:?})", m.state),
        ));
    }
    a.db.update::<MigrationRecord, _>(&migration_key(id), |r| {
        if r.state.done() {
            return false;
        }
        r.cancel = true;
        if r.state == MigrationState::Queued {
            r.state = MigrationState::Cancelled;
            r.finished = Some(now());
        }
        true
    })
    .await?;
    Ok(Json(json!({"id": id, "cancel": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiveReq {
    id: u64,
}

async fn internal_receive(State(a): Shared, Body(req): Body<ReceiveReq>) -> ApiResult {
    let listen = a.receive(req.id).await?;
    Ok(Json(json!({"listen": listen})))
}

async fn metrics(State(a): Shared) -> Response {
    let Ok(view) = View::read(&a.db).await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response();
    };
    let mut s = String::new();
    let mut gauge = |name: &str, help: &str, samples: Vec<(String, f64)>| {
        s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for (labels, v) in samples {
            s.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    let me = a.host().to_string();
    gauge(
        "ferry_cluster_hosts_up",
        "Hosts holding a lease.",
        vec![(String::new(), view.hosts.len() as f64)],
    );
    gauge(
        "ferry_cluster_hosts_standby",
        "Hosts the cluster switched off (power consolidation) or is switching on.",
        vec![(
            String::new(),
            view.admin.values().filter(|a| a.standing_by()).count() as f64,
        )],
    );
    gauge(
        "ferry_cluster_vms",
        "VMs defined in the cluster.",
        vec![(String::new(), view.vms.len() as f64)],
    );
    let states = ["queued", "running", "succeeded", "failed", "cancelled"];
    gauge(
        "ferry_cluster_migrations",
        "Migrations by state.",
        states
            .iter()
            .map(|st| {
                let n = view
                    .migrations
                    .iter()
                    .filter(|m| to_json(&m.state).as_str() == Some(st))
                    .count();
                (format!("{{state=\"{st}\"}}"), n as f64)
            })
            .collect(),
    );
    gauge(
        "ferry_host_is_coordinator",
        "1 on the coordinator.",
        vec![(
            format!("{{host=\"{me}\"}}"),
            f64::from(u8::from(a.is_coordinator())),
        )],
    );
    gauge(
        "ferry_host_fenced",
        "1 while this host has fenced itself.",
        vec![(
            format!("{{host=\"{me}\"}}"),
            f64::from(u8::from(a.is_fenced())),
        )],
    );
    if let Some(h) = view.hosts.get(&me) {
        gauge(
            "ferry_host_vms",
            "VMs running on this host.",
            vec![(format!("{{host=\"{me}\"}}"), h.vms.len() as f64)],
        );
        gauge(
            "ferry_host_memory_free_mib",
            "Available memory.",
            vec![(format!("{{host=\"{me}\"}}"), h.free_mib as f64)],
        );
        gauge(
            "ferry_host_load1",
            "One-minute load average.",
            vec![(format!("{{host=\"{me}\"}}"), h.load)],
        );
        let per_vm = |f: &dyn Fn(&VmUsage) -> f64| -> Vec<(String, f64)> {
            h.vm_usage
                .iter()
                .map(|u| (format!("{{host=\"{me}\",vm=\"{}\"}}", u.name), f(u)))
                .collect()
        };
        gauge(
            "ferry_vm_cpu_seconds",
            "CPU time used by each VM's worker on this host.",
            per_vm(&|u| u.cpu_seconds),
        );
        gauge(
            "ferry_vm_rss_mib",
            "Resident memory of each VM's worker on this host.",
            per_vm(&|u| u.rss_mib as f64),
        );
    }
    if let Some((host_cpu, vms)) = a.latest_cpu() {
        gauge(
            "ferry_host_cpu_cores",
            "CPU in use on this host, in cores, at the last utilization sample (every 10 s).",
            vec![(format!("{{host=\"{me}\"}}"), host_cpu)],
        );
        gauge(
            "ferry_vm_cpu_cores",
            "CPU each VM uses, in cores, at the last utilization sample.",
            vms.into_iter()
                .map(|(vm, c)| (format!("{{host=\"{me}\",vm=\"{vm}\"}}"), c))
                .collect(),
        );
    }
    let io = a.latest_io();
    let per_vm_io = |f: fn(&Throughput) -> f64| -> Vec<(String, f64)> {
        io.iter()
            .map(|(vm, t, _)| (format!("{{host=\"{me}\",vm=\"{vm}\"}}"), f(t)))
            .collect()
    };
    for (name, help, f) in [
        (
            "ferry_vm_disk_read_bytes_per_second",
            "Disk data each VM read, at the last utilization sample.",
            (|t: &Throughput| t.disk_read) as fn(&Throughput) -> f64,
        ),
        (
            "ferry_vm_disk_write_bytes_per_second",
            "Disk data each VM wrote, at the last utilization sample.",
            |t: &Throughput| t.disk_write,
        ),
        (
            "ferry_vm_net_rx_bytes_per_second",
            "Network bytes each VM received, at the last utilization sample.",
            |t: &Throughput| t.net_rx,
        ),
        (
            "ferry_vm_net_tx_bytes_per_second",
            "Network bytes each VM sent, at the last utilization sample.",
            |t: &Throughput| t.net_tx,
        ),
    ] {
        gauge(name, help, per_vm_io(f));
    }
    gauge(
        "ferry_vm_dirty_bytes_per_second",
        "How fast each VM's guest wrote its memory, from its worker's last sampling window.",
        io.iter()
            .map(|(vm, _, d)| (format!("{{host=\"{me}\",vm=\"{vm}\"}}"), *d))
            .collect(),
    );
    ([("content-type", "text/plain; version=0.0.4")], s).into_response()
}
