//! The Docker plugin's request bodies (`plugin/protocol.rs`), parsed as the handlers
//! parse them (`serde_json::from_slice`, whatever the Content-Type), against a reference
//! that reads the same bytes as untyped JSON and applies docs/docker-plugin.md: an object
//! with a string `Name` (and `ID` for Mount/Unmount), `Opts` absent, `null` or an object
//! of strings, unknown fields ignored. What parsed must be what the JSON says; a Create's
//! options then go through `VolumeOptions::parse`, checked by the `duration` target's
//! reference.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::plugin::protocol::{Answer, CreateRequest, MountRequest, NameRequest};

pub fn check(data: &[u8]) {
    let value = serde_json::from_slice::<Value>(data);
    let create = serde_json::from_slice::<CreateRequest>(data);
    let name = serde_json::from_slice::<NameRequest>(data);
    let mount = serde_json::from_slice::<MountRequest>(data);
    let value = match value {
        Ok(v) => v,
        Err(e) => {
            // Not JSON: the typed parses skip unknown fields without converting them (a
            // number too large for f64, a string with a lone surrogate escape), so they
            // may accept what untyped JSON refuses, but only there: what serde_json's
            // own skipping refuses, none may accept.
            let typed = create.is_ok() || name.is_ok() || mount.is_ok();
            let skipped = serde_json::from_slice::<serde::de::IgnoredAny>(data);
            assert!(
                !typed || skipped.is_ok(),
                "accepted what is not JSON ({e}): {data:?}"
            );
            return;
        }
    };
    let fields = Fields::of(&value);
    let twice = serde_json::from_slice::<KnownTwice>(data).is_ok_and(|k| k.0);
    compare(
        "Create",
        create.map(|c| (c.name, None, c.opts)),
        fields.create(),
        twice,
    );
    compare(
        "Name",
        name.map(|n| (n.name, None, None)),
        fields.name(),
        twice,
    );
    compare(
        "Mount",
        mount.map(|m| (m.name, Some(m.id), None)),
        fields.mount(),
        twice,
    );
    if let Ok(c) = serde_json::from_slice::<CreateRequest>(data) {
        let opts = c.opts.unwrap_or_default();
        super::duration::volume_options(&opts);
        answer_round_trip(&c.name);
    }
}

type Parsed = (String, Option<String>, Option<BTreeMap<String, String>>);

/// A typed parse against the reference. serde's derived structs also accept a JSON array
/// of the fields in order (dockerd never sends one), and refuse an object naming a known
/// field twice (untyped JSON keeps the last; the typed parse names the duplicate, or the
/// first one's wrong type): both are allowed here, and checked.
fn compare(
    what: &str,
    typed: Result<Parsed, serde_json::Error>,
    reference: Reference,
    known_twice: bool,
) {
    match (typed, reference) {
        (Err(_), Reference::Accept(_)) if known_twice => {}
        (Ok(t), Reference::Accept(r)) => assert_eq!(t, r, "{what}: typed parse differs"),
        (Ok(t), Reference::Array(name)) => assert_eq!(Some(&t.0), name.as_ref(), "{what}"),
        (Ok(t), Reference::Refuse) => panic!("{what}: accepted against the reference: {t:?}"),
        (Err(e), Reference::Accept(r)) => assert!(
            e.to_string().contains("duplicate field"),
            "{what}: {r:?} refused: {e}"
        ),
        (Err(_), _) => {}
    }
}

enum Reference {
    Accept(Parsed),
    /// An array: the typed parse may take its first element as `Name`.
    Array(Option<String>),
    Refuse,
}

struct Fields<'a> {
    object: Option<&'a serde_json::Map<String, Value>>,
    array: Option<&'a Vec<Value>>,
}

impl<'a> Fields<'a> {
    fn of(v: &'a Value) -> Self {
        Self {
            object: v.as_object(),
            array: v.as_array(),
        }
    }

    fn string(&self, key: &str) -> Option<String> {
        self.object?.get(key)?.as_str().map(str::to_string)
    }

    fn array(&self) -> Option<Reference> {
        let a = self.array?;
        Some(Reference::Array(
            a.first().and_then(Value::as_str).map(str::to_string),
        ))
    }

    fn name(&self) -> Reference {
        if let Some(r) = self.array() {
            return r;
        }
        match self.string("Name") {
            Some(n) => Reference::Accept((n, None, None)),
            None => Reference::Refuse,
        }
    }

    fn mount(&self) -> Reference {
        if let Some(r) = self.array() {
            return r;
        }
        match (self.string("Name"), self.string("ID")) {
            (Some(n), Some(id)) => Reference::Accept((n, Some(id), None)),
            _ => Reference::Refuse,
        }
    }

    fn create(&self) -> Reference {
        if let Some(r) = self.array() {
            return r;
        }
        let (Some(obj), Some(name)) = (self.object, self.string("Name")) else {
            return Reference::Refuse;
        };
        let opts = match obj.get("Opts") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => {
                let mut opts = BTreeMap::new();
                for (k, v) in m {
                    let Some(v) = v.as_str() else {
                        return Reference::Refuse;
                    };
                    opts.insert(k.clone(), v.to_string());
                }
                Some(opts)
            }
            Some(_) => return Reference::Refuse,
        };
        Reference::Accept((name, None, opts))
    }
}

/// An answer carrying any text (a name, an error) serialises to JSON that reads back as
/// that text under `Err`, which dockerd shows as is.
fn answer_round_trip(text: &str) {
    let a = serde_json::to_vec(&Answer::err(text.to_string()));
    let v: Value = match a.map(|a| serde_json::from_slice(&a)) {
        Ok(Ok(v)) => v,
        other => panic!("answer {text:?} does not round-trip: {other:?}"),
    };
    assert_eq!(v, serde_json::json!({ "Err": text }));
}

/// Whether a top-level object names `Name`, `ID` or `Opts` more than once.
struct KnownTwice(bool);

impl<'de> serde::Deserialize<'de> for KnownTwice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = KnownTwice;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<KnownTwice, A::Error> {
                let mut seen = std::collections::BTreeSet::new();
                let mut twice = false;
                while let Some(k) = m.next_key::<String>()? {
                    m.next_value::<serde::de::IgnoredAny>()?;
                    if matches!(k.as_str(), "Name" | "ID" | "Opts") && !seen.insert(k) {
                        twice = true;
                    }
                }
                Ok(KnownTwice(twice))
            }
        }
        d.deserialize_map(V)
    }
}
