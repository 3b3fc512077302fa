//! Power consolidation's endpoints: the mode (`/v1/cluster/power`) and switching one host off
//! or on by hand (`/v1/hosts/{host}/standby`, `/v1/hosts/{host}/wake`). The API only records
//! the request in the host's admin record; the coordinator empties the host and runs its power
//! driver (`crate::power`).

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{bad, policy, power_state, ApiResult, Body, Shared};
use crate::power::{evacuating, request_wake, PowerError};
use crate::records::*;
use crate::view::View;

/// `GET /v1/cluster/power`: the mode, the band and the coordinator's last advice.
pub(super) async fn get_power(State(a): Shared) -> ApiResult {
    let p = policy(&a).await?;
    let advice =
        a.db.get::<PowerAdviceRecord>(&power_advice_key())
            .await?
            .map(|(_, r)| r);
    let c = &a.cfg.power;
    Ok(Json(json!({
        "mode": p.power,
        "low": c.low,
        "high": c.high,
        "min_on": c.min_on,
        "off_after_s": c.off_after_s,
        "on_after_s": c.on_after_s,
        "advice": advice,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SetPower {
    mode: BalanceMode,
}

/// `POST /v1/cluster/power`: the mode for the whole cluster.
pub(super) async fn set_power(State(a): Shared, Body(req): Body<SetPower>) -> ApiResult {
    let key = policy_key();
    loop {
        let (rev, mut p) = match a.db.get::<PolicyRecord>(&key).await? {
            Some((rev, p)) => (rev, p),
            None => (0, policy(&a).await?),
        };
        p.power = req.mode;
        if a.db
            .store
            .compare_and_put(&key, rev, encode(&p)?, None)
            .await?
        {
            return Ok(Json(json!({"mode": p.power})));
        }
    }
}

/// `POST /v1/hosts/{host}/standby`: empty the host by live migration, then switch it off.
/// Refused, changing nothing, when it has no power driver or one of its VMs has nowhere to go.
pub(super) async fn standby(State(a): Shared, Path(h): Path<String>) -> ApiResult {
    let view = View::read(&a.db).await?;
    if !view.hosts.contains_key(&h) {
        return Err(bad(404, format!("no live host named {h:?} in the cluster")));
    }
    if let Some(adm) = view.admin.get(&h) {
        if adm.power != PowerState::On {
            return Err(bad(409, format!("{h} is already {}", power_state(adm))));
        }
        if adm.draining {
            return Err(bad(409, format!("{h} is being drained for maintenance")));
        }
    }
    if !a.cfg.power.drives(&h) {
        let way = if a.cfg.power.command(&h, false).is_none() {
            "off"
        } else {
            "on"
        };
        return Err(bad(
            409,
            PowerError::NoDriver {
                host: h.clone(),
                way,
            }
            .to_string(),
        ));
    }
    let mut extra: HashMap<String, u64> = HashMap::new();
    let mut names: Vec<&String> = view.vms.keys().collect();
    names.sort();
    let mut vms = 0;
    for n in names {
        let v = &view.vms[n];
        if v.owner.as_deref() != Some(h.as_str()) || v.desired != Desired::Running {
            continue;
        }
        vms += 1;
        match view.best_host(v, Some(&h), &extra) {
            Ok(to) => *extra.entry(to).or_default() += v.config.memory_mib,
            Err(why) => {
                return Err(bad(
                    409,
                    format!("{n} would have nowhere to go if {h} were switched off: {why}"),
                ))
            }
        }
    }
    let reason = format!("switched off by hand (`ferry host standby {h}`)");
    let key = admin_key(&h);
    let wrote =
        a.db.update::<HostAdmin, _>(&key, |r| {
            if r.power != PowerState::On || r.draining {
                return false;
            }
            *r = evacuating(reason.clone());
            true
        })
        .await?
            || a.db
                .store
                .compare_and_put(&key, 0, encode(&evacuating(reason.clone()))?, None)
                .await?;
    if !wrote {
        return Err(bad(409, format!("{h} changed state meanwhile; try again")));
    }
    Ok(Json(json!({"host": h, "state": "evacuating", "vms": vms})))
}

/// `POST /v1/hosts/{host}/wake`: switch a standby host on again.
pub(super) async fn wake(State(a): Shared, Path(h): Path<String>) -> ApiResult {
    let view = View::read(&a.db).await?;
    let Some(adm) = view.admin.get(&h) else {
        return match view.hosts.contains_key(&h) {
            true => Err(bad(409, format!("{h} is on"))),
            false => Err(bad(404, format!("no host named {h:?} in the cluster"))),
        };
    };
    match adm.power {
        PowerState::Standby => {}
        PowerState::Wake | PowerState::Waking => {
            return Ok(Json(json!({"host": h, "state": "waking"})));
        }
        PowerState::On | PowerState::Evacuating => {
            return Err(bad(409, format!("{h} is {}", power_state(adm))));
        }
    }
    if a.cfg.power.command(&h, true).is_none() {
        return Err(bad(
            409,
            PowerError::NoDriver {
                host: h.clone(),
                way: "on",
            }
            .to_string(),
        ));
    }
    if !request_wake(
        &a.db,
        &h,
        &format!("switched on by hand (`ferry host wake {h}`)"),
    )
    .await?
    {
        return Err(bad(409, format!("{h} changed state meanwhile; try again")));
    }
    Ok(Json(json!({"host": h, "state": "waking"})))
}
