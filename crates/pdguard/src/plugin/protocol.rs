//! The volume plugin protocol's JSON, as dockerd 20.10 (API 1.41) sends and reads it.
//! Field names are Docker's. Unknown fields are ignored (dockerd may add some); a missing
//! `Name` is an error.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `/VolumeDriver.Create`. `Opts` is `null` when no `-o` was given.
#[derive(Debug, Deserialize)]
pub struct CreateRequest {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Opts", default)]
    pub opts: Option<BTreeMap<String, String>>,
}

/// `/VolumeDriver.Remove`, `.Get`, `.Path`.
#[derive(Debug, Deserialize)]
pub struct NameRequest {
    #[serde(rename = "Name")]
    pub name: String,
}

/// `/VolumeDriver.Mount`, `.Unmount`: `ID` is a random value per mount, not a container id.
#[derive(Debug, Deserialize)]
pub struct MountRequest {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "ID")]
    pub id: String,
}

#[derive(Debug, Serialize)]
pub struct Volume {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Mountpoint", skip_serializing_if = "String::is_empty")]
    pub mountpoint: String,
    #[serde(rename = "Status", skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// Every answer: the fields a method uses, and `Err` (empty on success).
#[derive(Debug, Default, Serialize)]
pub struct Answer {
    #[serde(rename = "Err")]
    pub err: String,
    #[serde(rename = "Mountpoint", skip_serializing_if = "Option::is_none")]
    pub mountpoint: Option<String>,
    #[serde(rename = "Volume", skip_serializing_if = "Option::is_none")]
    pub volume: Option<Volume>,
    #[serde(rename = "Volumes", skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<Volume>>,
}

impl Answer {
    pub fn err(msg: String) -> Self {
        Self {
            err: msg,
            ..Self::default()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_as_dockerd_sends_them() {
        let c: CreateRequest = serde_json::from_str(r#"{"Name":"v1","Opts":null}"#).unwrap();
        assert_eq!((c.name.as_str(), c.opts), ("v1", None));
        let c: CreateRequest =
            serde_json::from_str(r#"{"Name":"v1","Opts":{"size":"1G"}}"#).unwrap();
        assert_eq!(c.opts.unwrap()["size"], "1G");
        let m: MountRequest =
            serde_json::from_str(r#"{"Name":"v1","ID":"abc","Extra":1}"#).unwrap();
        assert_eq!((m.name.as_str(), m.id.as_str()), ("v1", "abc"));
        assert!(serde_json::from_str::<NameRequest>("{}").is_err());
        assert!(serde_json::from_str::<CreateRequest>(r#"{"Name":"v","Opts":{"a":1}}"#).is_err());
    }

    #[test]
    fn answers_carry_err_always() {
        let a = serde_json::to_value(Answer::default()).unwrap();
        assert_eq!(a, serde_json::json!({"Err": ""}));
        let a = serde_json::to_value(Answer {
            mountpoint: Some("/m".into()),
            ..Answer::default()
        })
        .unwrap();
        assert_eq!(a, serde_json::json!({"Err": "", "Mountpoint": "/m"}));
    }
}
