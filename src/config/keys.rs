//! The list of keys, read from the section structs rather than written out.
//!
//! Serde's derived `Deserialize` names a struct's fields when it asks for a struct, and
//! asks for a string, an integer, a boolean or a list when it reads a field. [`keys`]
//! plays a deserializer that only listens: it asks [`Config`] for its sections, each
//! section for its keys, and each key for the kind of value it takes (which is how an
//! environment variable's text is converted). A key added to a section struct is thereby
//! a key of the file, an environment variable and a flag target at once.

use std::cell::RefCell;
use std::fmt;
use std::sync::OnceLock;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};

use super::Config;

/// One configuration key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    /// The section, e.g. `server`.
    pub section: &'static str,
    /// The key within it, e.g. `listen`.
    pub name: &'static str,
    /// `section.name`, e.g. `server.listen`.
    pub dotted: &'static str,
    /// The environment variable that sets it, e.g. `PGFEED_SERVER_LISTEN`.
    pub env: String,
    /// The kind of value it takes.
    pub kind: Kind,
}

/// The kind of value a key takes, for converting environment strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A string (durations, addresses and modes are strings too).
    Str,
    /// An integer.
    Int,
    /// `true` or `false`.
    Bool,
    /// A list of strings (comma-separated in the environment).
    List,
}

/// Every key the configuration knows, in the order of the structs.
pub fn keys() -> &'static [Key] {
    static KEYS: OnceLock<Vec<Key>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut keys = Vec::new();
        for (i, section) in listen(&[]).fields.iter().enumerate() {
            for (j, name) in listen(&[i]).fields.iter().enumerate() {
                let dotted: &'static str = Box::leak(format!("{section}.{name}").into_boxed_str());
                keys.push(Key {
                    section,
                    name,
                    dotted,
                    env: format!("PGFEED_{}", dotted.replace('.', "_").to_ascii_uppercase()),
                    kind: listen(&[i, j]).kind.unwrap_or(Kind::Str),
                });
            }
        }
        keys
    })
}

/// The key `section.name`, if there is one.
pub(crate) fn find(section: &str, name: &str) -> Option<&'static Key> {
    keys()
        .iter()
        .find(|k| k.section == section && k.name == name)
}

/// The sections (`&[]`), a section's keys (`&[i]`) or a key's kind (`&[i, j]`), as
/// [`Config`]'s `Deserialize` asks for them.
fn listen(path: &[usize]) -> Heard {
    let heard = RefCell::new(Heard::default());
    // It always ends in `Stop`, once the listener has heard what it wanted.
    let _ = Config::deserialize(Listener {
        path,
        heard: &heard,
    });
    heard.into_inner()
}

#[derive(Default)]
struct Heard {
    fields: &'static [&'static str],
    kind: Option<Kind>,
}

/// The only error: the listener has heard what it wanted (or something it does not know).
#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stop")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: fmt::Display>(_: T) -> Stop {
        Stop
    }
}

/// Follows `path` (a field of the struct asked for, then a field of that one) and records
/// what is asked at its end.
struct Listener<'a> {
    path: &'a [usize],
    heard: &'a RefCell<Heard>,
}

impl Listener<'_> {
    fn kind<T>(self, kind: Kind) -> Result<T, Stop> {
        self.heard.borrow_mut().kind = Some(kind);
        Err(Stop)
    }
}

macro_rules! heard {
    ($kind:expr => $($method:ident)*) => {
        $(fn $method<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            self.kind($kind)
        })*
    };
}

impl<'de> de::Deserializer<'de> for Listener<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    heard!(Kind::Str => deserialize_str deserialize_string deserialize_char);
    heard!(Kind::Int => deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64);
    heard!(Kind::Bool => deserialize_bool);
    heard!(Kind::List => deserialize_seq);

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Stop> {
        // Modes are written as strings.
        self.kind(Kind::Str)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Stop> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Stop> {
        match self.path.split_first() {
            None => {
                self.heard.borrow_mut().fields = fields;
                Err(Stop)
            }
            Some((&i, rest)) => {
                let key = *fields.get(i).ok_or(Stop)?;
                visitor.visit_map(OneEntry {
                    key: Some(key),
                    value: Listener {
                        path: rest,
                        heard: self.heard,
                    },
                })
            }
        }
    }

    serde::forward_to_deserialize_any! {
        f32 f64 bytes byte_buf unit unit_struct tuple tuple_struct map identifier
        ignored_any
    }
}

/// A map of one entry, `key` → what the listener hears.
struct OneEntry<'a> {
    key: Option<&'static str>,
    value: Listener<'a>,
}

impl<'de, 'a> MapAccess<'de> for OneEntry<'a> {
    type Error = Stop;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Stop> {
        match self.key.take() {
            Some(key) => seed.deserialize(key.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Stop> {
        seed.deserialize(Listener {
            path: self.value.path,
            heard: self.value.heard,
        })
    }
}
