//! Re-adoption at start: what an earlier run of the daemon recorded becomes instances again.

use std::sync::Arc;

use evp_schemas::deployment::validate_instance_name;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    AdoptSpec, Adoption, DIED_WHILE_AWAY, Instance, Module, Phase, Recovery, Status, Supervisor,
};
use crate::record::{self, InstanceRecord};

impl Supervisor {
    /// Takes back what an earlier run of the daemon recorded, before the bus is served:
    /// instances whose process still runs (same PID, same start time) are `ok` again and can
    /// be stopped as before; those whose process is gone are `error`
    /// ([`DIED_WHILE_AWAY`]); those that had ended keep the status they ended with. All stay in
    /// `Instances` until stopped, and each is announced as a change.
    pub async fn recover(self: &Arc<Self>) -> Recovery {
        let mut out = Recovery::default();
        let entries = match std::fs::read_dir(&self.instances_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return out,
            Err(e) => {
                warn!(dir = %self.instances_dir.display(), "no instance can be re-adopted: {e}");
                return out;
            }
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| validate_instance_name(n).is_ok())
            .collect();
        names.sort_unstable();
        for name in names {
            let rec = match record::load(&self.instance_dir(&name)) {
                Ok(Some(rec)) => rec,
                Ok(None) => continue,
                Err(e) => {
                    warn!(instance = %name, "not re-adopted: {e}");
                    continue;
                }
            };
            self.recover_one(&name, rec, &mut out).await;
        }
        for runtime in self.runtimes.values() {
            runtime.sweep(&out.adopted).await;
        }
        info!(
            adopted = ?out.adopted,
            died = ?out.died,
            ended = ?out.ended,
            "instances recorded by the previous run recovered"
        );
        out
    }

    async fn recover_one(
        self: &Arc<Self>,
        name: &str,
        mut rec: InstanceRecord,
        out: &mut Recovery,
    ) {
        let runtime = self.runtimes.get(rec.kind.as_str()).cloned();
        let adoption = match (&rec.ended, rec.process, &runtime) {
            (Some(_), _, _) => None,
            (None, Some(process), Some(runtime)) => Some(
                runtime
                    .adopt(AdoptSpec {
                        instance: name.to_owned(),
                        instance_dir: self.instance_dir(name),
                        process,
                        uid: rec.uid,
                        container: rec.container.clone(),
                    })
                    .await,
            ),
            (None, None, _) => Some(Ok(Adoption::Gone("no process was recorded".into()))),
            (None, Some(_), None) => Some(Err(format!(
                "kind {:?} is not run by this build; its process was not re-adopted",
                rec.kind
            ))),
        };
        let mut adopted = None;
        let (status, phase, exited) = match adoption {
            None => {
                out.ended.push(name.to_owned());
                let ended = rec.ended.clone().unwrap_or_else(|| Status::Ok.to_ended());
                (Status::from_ended(&ended), Phase::Gone, None)
            }
            Some(Ok(Adoption::Running(started))) => {
                out.adopted.push(name.to_owned());
                adopted = Some((started.pid, started.scope));
                (
                    Status::Ok,
                    Phase::Running(started.workload),
                    Some(started.exited),
                )
            }
            Some(Ok(Adoption::Gone(why))) => {
                info!(instance = name, "{DIED_WHILE_AWAY}: {why}");
                out.died.push(name.to_owned());
                (Status::Error(DIED_WHILE_AWAY.to_owned()), Phase::Gone, None)
            }
            Some(Err(why)) => {
                warn!(instance = name, "not re-adopted: {why}");
                out.died.push(name.to_owned());
                (
                    Status::Error(format!("not re-adopted after a restart: {why}")),
                    Phase::Gone,
                    None,
                )
            }
        };
        if exited.is_none() && rec.ended.is_none() {
            rec.ended = Some(status.to_ended());
            self.save_record(name, &rec);
        }
        let generation = {
            let mut state = self.lock();
            if exited.is_some() && runtime.is_some() {
                // StartInstance of the same module must find it loaded to be the no-op it is
                // for a running instance; reconcilerd's own LoadModule replaces this entry.
                state
                    .modules
                    .entry(rec.module_id.clone())
                    .or_insert_with(|| Module {
                        kind: runtime.as_ref().map_or("", |r| r.kind()),
                        location: rec.module_location.clone(),
                    });
            }
            let generation = state.next_generation;
            state.next_generation += 1;
            let (pid, scope) = adopted.unzip();
            state.instances.insert(
                name.to_owned(),
                Instance {
                    module_id: rec.module_id.clone(),
                    generation,
                    status: status.clone(),
                    stopping: false,
                    phase: watch::Sender::new(phase),
                    record: Some(rec),
                    pid,
                    scope: scope.flatten(),
                },
            );
            state.emit(name, status.state(), status.message());
            generation
        };
        if let Some(exited) = exited {
            self.watch_exit(name, generation, exited);
        }
    }
}
