//! A small client of dockerd's Engine API (v1.41) over its unix socket, with hyper: the
//! calls the association policy needs (`/containers/json`, `/containers/{id}/json`,
//! `/events`, and `/volumes` filtered by our driver to make dockerd activate the plugin),
//! behind the engine's `DockerApi` trait.

use std::path::PathBuf;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use pdguard_engine::service::docker::{
    DockerApi, DockerContainer, DockerError, DockerEvent, Listed, RunState,
};
use serde_json::Value;
use tokio::sync::mpsc;

const API: &str = "/v1.41";
/// The label Swarm puts on every task's container.
const SWARM_TASK: &str = "com.docker.swarm.task.id";

/// dockerd at a unix socket.
#[derive(Debug, Clone)]
pub struct Dockerd {
    socket: PathBuf,
}

impl Dockerd {
    /// `unix:///var/run/docker.sock` or a plain absolute path.
    pub fn parse(host: &str) -> Result<Self, String> {
        let path = host.strip_prefix("unix://").unwrap_or(host);
        if !path.starts_with('/') {
            return Err(format!(
                "--docker-host {host:?} is not unix:///path/to/docker.sock; only dockerd's unix socket is supported"
            ));
        }
        Ok(Self {
            socket: PathBuf::from(path),
        })
    }

    fn at(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    fn proto(&self, path: &str, why: impl std::fmt::Display) -> DockerError {
        DockerError::Protocol {
            at: self.at(),
            path: path.into(),
            why: why.to_string(),
        }
    }

    /// Send a GET; return the status and the response (body not yet read).
    async fn get(&self, path: &str) -> Result<hyper::Response<hyper::body::Incoming>, DockerError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| DockerError::Unreachable {
                at: self.at(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.proto(path, e))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method("GET")
            .uri(format!("{API}{path}"))
            .header("host", "docker")
            .body(Empty::<Bytes>::new())
            .map_err(|e| self.proto(path, e))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| self.proto(path, e))
    }

    /// GET a JSON document; 404 is None.
    async fn get_json(&self, path: &str) -> Result<Option<Value>, DockerError> {
        let resp = self.get(path).await?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.proto(path, e))?
            .to_bytes();
        match status {
            200 => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| self.proto(path, format!("JSON that does not parse: {e}"))),
            404 => Ok(None),
            s => Err(self.proto(
                path,
                format!("HTTP {s}: {}", String::from_utf8_lossy(&body).trim()),
            )),
        }
    }
}

/// Names of the volumes of `driver` in a container's `Mounts`.
fn volumes_of(mounts: &Value, driver: &str) -> Vec<String> {
    mounts
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|m| m["Type"] == "volume" && m["Driver"] == driver)
                .filter_map(|m| m["Name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A container from `/containers/{id}/json`.
fn from_inspect(v: &Value, driver: &str) -> Option<DockerContainer> {
    let policy = &v["HostConfig"]["RestartPolicy"];
    let max = policy["MaximumRetryCount"].as_i64().unwrap_or(0);
    let count = v["RestartCount"].as_i64().unwrap_or(0);
    let restarts = match policy["Name"].as_str().unwrap_or("") {
        "always" | "unless-stopped" => true,
        "on-failure" => max == 0 || count < max,
        _ => false,
    };
    Some(DockerContainer {
        id: v["Id"].as_str()?.to_string(),
        state: RunState::parse(v["State"]["Status"].as_str()?)?,
        exit_code: v["State"]["ExitCode"].as_i64().unwrap_or(0),
        restarts,
        volumes: volumes_of(&v["Mounts"], driver),
        task: v["Config"]["Labels"][SWARM_TASK].is_string(),
    })
}

/// One event of `/events`, if the policy cares about it.
fn event_of(v: &Value) -> Option<DockerEvent> {
    let actor = &v["Actor"];
    let attr = |k: &str| actor["Attributes"][k].as_str().map(str::to_string);
    let id = actor["ID"].as_str()?.to_string();
    match (v["Type"].as_str()?, v["Action"].as_str()?) {
        ("volume", "mount") => Some(DockerEvent::VolumeMount {
            volume: id,
            container: attr("container")?,
            driver: attr("driver")?,
        }),
        ("container", "kill") => Some(DockerEvent::Kill { container: id }),
        ("container", "die") => Some(DockerEvent::Die {
            container: id,
            exit_code: attr("exitCode")?.parse().ok()?,
            // dockerd copies the container's labels into the event's attributes.
            task: attr(SWARM_TASK).is_some(),
        }),
        ("container", "destroy") => Some(DockerEvent::Destroy { container: id }),
        ("container", "start") => Some(DockerEvent::Start { container: id }),
        ("container", "stop") => Some(DockerEvent::Stop { container: id }),
        ("volume", "unmount") => Some(DockerEvent::VolumeUnmount {
            volume: id,
            container: attr("container")?,
        }),
        _ => None,
    }
}

/// The containers of a `/containers/json?all=1` answer that use a volume of `driver`.
fn listed_of(list: &Value, driver: &str) -> Option<Vec<Listed>> {
    Some(
        list.as_array()?
            .iter()
            .filter(|c| !volumes_of(&c["Mounts"], driver).is_empty())
            .filter_map(|c| {
                Some(Listed {
                    id: c["Id"].as_str()?.to_string(),
                    state: RunState::parse(c["State"].as_str()?)?,
                })
            })
            .collect(),
    )
}

impl DockerApi for Dockerd {
    async fn list(&self, driver: &str) -> Result<Vec<Listed>, DockerError> {
        let path = "/containers/json?all=1";
        let list = self.get_json(path).await?.unwrap_or(Value::Null);
        listed_of(&list, driver).ok_or_else(|| self.proto(path, "something that is not a list"))
    }

    async fn containers(&self, driver: &str) -> Result<Vec<DockerContainer>, DockerError> {
        let mut out = Vec::new();
        // The list has neither exit codes nor restart policies.
        for l in self.list(driver).await? {
            if let Some(full) = self.inspect(&l.id, driver).await? {
                out.push(full);
            }
        }
        Ok(out)
    }

    async fn inspect(
        &self,
        id: &str,
        driver: &str,
    ) -> Result<Option<DockerContainer>, DockerError> {
        if !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Ok(None);
        }
        let path = format!("/containers/{id}/json");
        Ok(self
            .get_json(&path)
            .await?
            .and_then(|v| from_inspect(&v, driver)))
    }

    async fn activate(&self, driver: &str) -> Result<(), DockerError> {
        // filters={"driver":["NAME"]}: dockerd asks the plugin for its List, which activates
        // it. NAME is 1-64 letters, digits, '.', '_' or '-' (checked by `serve`): no escaping.
        let path = format!("/volumes?filters=%7B%22driver%22%3A%5B%22{driver}%22%5D%7D");
        self.get_json(&path).await.map(|_| ())
    }

    async fn events(&self, tx: mpsc::Sender<DockerEvent>) -> Result<(), DockerError> {
        // filters={"type":["container","volume"]}
        let path = "/events?filters=%7B%22type%22%3A%5B%22container%22%2C%22volume%22%5D%7D";
        let resp = self.get(path).await?;
        if resp.status().as_u16() != 200 {
            return Err(self.proto(path, format!("HTTP {}", resp.status())));
        }
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.proto(path, e))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.extend_from_slice(data);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                    tracing::warn!("dockerd sent an event that is not JSON; ignored");
                    continue;
                };
                if let Some(ev) = event_of(&v) {
                    if tx.send(ev).await.is_err() {
                        return Ok(());
                    }
                }
            }
            if buf.len() > 1 << 20 {
                return Err(self.proto(path, "an event longer than 1 MiB"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hosts_parse() {
        assert_eq!(
            Dockerd::parse("unix:///var/run/docker.sock")
                .unwrap()
                .socket,
            PathBuf::from("/var/run/docker.sock")
        );
        assert!(Dockerd::parse("/run/d.sock").is_ok());
        assert!(Dockerd::parse("tcp://1.2.3.4:2375").is_err());
    }

    #[test]
    fn events_are_read_as_dockerd_sends_them() {
        let m = json!({"Type":"volume","Action":"mount","Actor":{"ID":"v1","Attributes":{
            "container":"abc","destination":"/data","driver":"pd","propagation":"","read/write":"true"}}});
        assert_eq!(
            event_of(&m),
            Some(DockerEvent::VolumeMount {
                volume: "v1".into(),
                container: "abc".into(),
                driver: "pd".into()
            })
        );
        let d = json!({"Type":"container","Action":"die","Actor":{"ID":"abc","Attributes":{"exitCode":"3"}}});
        assert_eq!(
            event_of(&d),
            Some(DockerEvent::Die {
                container: "abc".into(),
                exit_code: 3,
                task: false,
            })
        );
        let t = json!({"Type":"container","Action":"die","Actor":{"ID":"abc","Attributes":{
            "exitCode":"137","com.docker.swarm.task.id":"t1","com.docker.swarm.service.name":"db"}}});
        assert_eq!(
            event_of(&t),
            Some(DockerEvent::Die {
                container: "abc".into(),
                exit_code: 137,
                task: true,
            })
        );
        let x = json!({"Type":"container","Action":"exec_start: sh","Actor":{"ID":"abc"}});
        assert_eq!(event_of(&x), None);
        assert_eq!(event_of(&json!({"Type":"container"})), None);
    }

    #[test]
    fn the_list_keeps_containers_of_the_driver_with_their_state() {
        let v = json!([
            {"Id":"a","State":"running","Mounts":[{"Type":"volume","Name":"v1","Driver":"pd"}]},
            {"Id":"b","State":"exited","Mounts":[{"Type":"volume","Name":"v2","Driver":"local"}]},
            {"Id":"c","State":"exited","Mounts":[{"Type":"volume","Name":"v3","Driver":"pd"}]},
            {"Id":"d","State":"bogus","Mounts":[{"Type":"volume","Name":"v4","Driver":"pd"}]}
        ]);
        assert_eq!(
            listed_of(&v, "pd").unwrap(),
            vec![
                Listed {
                    id: "a".into(),
                    state: RunState::Running
                },
                Listed {
                    id: "c".into(),
                    state: RunState::Exited
                }
            ]
        );
        assert!(listed_of(&json!({}), "pd").is_none());
        let s = json!({"Type":"container","Action":"start","Actor":{"ID":"abc"}});
        assert_eq!(
            event_of(&s),
            Some(DockerEvent::Start {
                container: "abc".into()
            })
        );
        let u = json!({"Type":"volume","Action":"unmount","Actor":{"ID":"v1","Attributes":{"container":"abc","driver":"pd"}}});
        assert_eq!(
            event_of(&u),
            Some(DockerEvent::VolumeUnmount {
                volume: "v1".into(),
                container: "abc".into()
            })
        );
    }

    #[test]
    fn inspect_reads_state_restart_policy_and_volumes() {
        let v = json!({"Id":"abc","RestartCount":0,
            "State":{"Status":"exited","ExitCode":3},
            "HostConfig":{"RestartPolicy":{"Name":"on-failure","MaximumRetryCount":2}},
            "Mounts":[{"Type":"volume","Name":"v1","Driver":"pd"},
                      {"Type":"volume","Name":"v2","Driver":"local"},
                      {"Type":"bind","Source":"/x"}]});
        let c = from_inspect(&v, "pd").unwrap();
        assert_eq!(c.state, RunState::Exited);
        assert_eq!(c.exit_code, 3);
        assert!(c.restarts);
        assert_eq!(c.volumes, vec!["v1".to_string()]);
        assert!(!c.task);
        let mut task = v.clone();
        task["Config"] = json!({"Labels":{"com.docker.swarm.task.id":"t1"}});
        assert!(from_inspect(&task, "pd").unwrap().task);
        let mut v2 = v.clone();
        v2["RestartCount"] = json!(2);
        assert!(!from_inspect(&v2, "pd").unwrap().restarts);
        v2["HostConfig"]["RestartPolicy"]["Name"] = json!("no");
        assert!(!from_inspect(&v2, "pd").unwrap().restarts);
    }
}
