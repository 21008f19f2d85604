//! JSON for scripts: what the command line prints with `--json`.
//!
//! Every 64-bit integer (`u64`, `i64`, `usize`, and wider) is written as a
//! decimal string, so tools that read JSON numbers as doubles (JavaScript,
//! `jq`) never round a count, a byte figure or a digest:
//! `"pages": {"raw": "123456"}`. Integers of 32 bits and less (rounds,
//! percentages, lane counts) and floats (milliseconds, rates, ratios) stay
//! numbers. The rule follows the Rust type, not the value, so a field is
//! always one JSON type.
//!
//! It is one serializer adapter ([`to_string`], [`to_string_pretty`])
//! around `serde_json`'s, so every type printed through it follows the
//! rule, the engine's and the VM's included, with no per-field markup.
//! Print typed values: a `serde_json::Value` has forgotten its Rust types
//! (every whole number in it is 64-bit) and would print all of them as
//! strings.
//!
//! The control socket itself carries counts as JSON numbers (both of its
//! ends are typed Rust, which reads them exactly); only the values that use
//! all 64 bits (the memory digest, nanosecond timestamps) are strings there
//! too (see [`crate::protocol`]).
//!
//! ```
//! #[derive(serde::Serialize)]
//! struct Round { round: u32, wire_bytes: u64, ms: f64 }
//! let line = ferry_control::json::to_string(&Round { round: 3, wire_bytes: 1 << 60, ms: 1.5 }).unwrap();
//! assert_eq!(line, r#"{"round":3,"wire_bytes":"1152921504606846976","ms":1.5}"#);
//! ```

use serde::ser::{self, Serialize, Serializer};

/// `value` as one line of JSON, 64-bit integers as strings.
pub fn to_string<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    let mut out = Vec::new();
    value.serialize(Wide(&mut serde_json::Serializer::new(&mut out)))?;
    String::from_utf8(out).map_err(ser::Error::custom)
}

/// `value` as indented JSON, 64-bit integers as strings.
pub fn to_string_pretty<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    let mut out = Vec::new();
    value.serialize(Wide(&mut serde_json::Serializer::pretty(&mut out)))?;
    String::from_utf8(out).map_err(ser::Error::custom)
}

/// A serializer (or one of its compound parts) that writes 64-bit and
/// wider integers as strings and passes everything else to the one inside.
struct Wide<S>(S);

/// A value to serialize through [`Wide`].
struct Through<'a, T: ?Sized>(&'a T);

impl<T: Serialize + ?Sized> Serialize for Through<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(Wide(s))
    }
}

macro_rules! pass {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(fn $method(self, v: $ty) -> Result<S::Ok, S::Error> {
            self.0.$method(v)
        })*
    };
}

macro_rules! as_string {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(fn $method(self, v: $ty) -> Result<S::Ok, S::Error> {
            self.0.collect_str(&v)
        })*
    };
}

impl<S: Serializer> Serializer for Wide<S> {
    type Ok = S::Ok;
    type Error = S::Error;
    type SerializeSeq = Wide<S::SerializeSeq>;
    type SerializeTuple = Wide<S::SerializeTuple>;
    type SerializeTupleStruct = Wide<S::SerializeTupleStruct>;
    type SerializeTupleVariant = Wide<S::SerializeTupleVariant>;
    type SerializeMap = Wide<S::SerializeMap>;
    type SerializeStruct = Wide<S::SerializeStruct>;
    type SerializeStructVariant = Wide<S::SerializeStructVariant>;

    pass! {
        serialize_bool(bool), serialize_i8(i8), serialize_i16(i16), serialize_i32(i32),
        serialize_u8(u8), serialize_u16(u16), serialize_u32(u32),
        serialize_f32(f32), serialize_f64(f64), serialize_char(char),
        serialize_str(&str), serialize_bytes(&[u8]),
    }

    as_string! {
        serialize_i64(i64), serialize_u64(u64), serialize_i128(i128), serialize_u128(u128),
    }

    fn serialize_none(self) -> Result<S::Ok, S::Error> {
        self.0.serialize_none()
    }

    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<S::Ok, S::Error> {
        self.0.serialize_some(&Through(v))
    }

    fn serialize_unit(self) -> Result<S::Ok, S::Error> {
        self.0.serialize_unit()
    }

    fn serialize_unit_struct(self, name: &'static str) -> Result<S::Ok, S::Error> {
        self.0.serialize_unit_struct(name)
    }

    fn serialize_unit_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
    ) -> Result<S::Ok, S::Error> {
        self.0.serialize_unit_variant(name, index, variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        v: &T,
    ) -> Result<S::Ok, S::Error> {
        self.0.serialize_newtype_struct(name, &Through(v))
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        v: &T,
    ) -> Result<S::Ok, S::Error> {
        self.0
            .serialize_newtype_variant(name, index, variant, &Through(v))
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq, S::Error> {
        self.0.serialize_seq(len).map(Wide)
    }

    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple, S::Error> {
        self.0.serialize_tuple(len).map(Wide)
    }

    fn serialize_tuple_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct, S::Error> {
        self.0.serialize_tuple_struct(name, len).map(Wide)
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant, S::Error> {
        self.0
            .serialize_tuple_variant(name, index, variant, len)
            .map(Wide)
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap, S::Error> {
        self.0.serialize_map(len).map(Wide)
    }

    fn serialize_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStruct, S::Error> {
        self.0.serialize_struct(name, len).map(Wide)
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant, S::Error> {
        self.0
            .serialize_struct_variant(name, index, variant, len)
            .map(Wide)
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

impl<S: ser::SerializeSeq> ser::SerializeSeq for Wide<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), S::Error> {
        self.0.serialize_element(&Through(v))
    }

    fn end(self) -> Result<S::Ok, S::Error> {
        self.0.end()
    }
}

impl<S: ser::SerializeTuple> ser::SerializeTuple for Wide<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), S::Error> {
        self.0.serialize_element(&Through(v))
    }

    fn end(self) -> Result<S::Ok, S::Error> {
        self.0.end()
    }
}

impl<S: ser::SerializeTupleStruct> ser::SerializeTupleStruct for Wide<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), S::Error> {
        self.0.serialize_field(&Through(v))
    }

    fn end(self) -> Result<S::Ok, S::Error> {
        self.0.end()
    }
}

impl<S: ser::SerializeTupleVariant> ser::SerializeTupleVariant for Wide<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), S::Error> {
        self.0.serialize_field(&Through(v))
    }

    fn end(self) -> Result<S::Ok, S::Error> {
        self.0.end()
    }
}

impl<S: ser::SerializeMap> ser::SerializeMap for Wide<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Result<(), S::Error> {
        self.0.serialize_key(&Through(k))
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), S::Error> {
        self.0.serialize_value(&Through(v))
    }

    fn end(self) -> Result<S::Ok, S::Error> {
        self.0.end()
    }
}

impl<S: ser::SerializeStruct> ser::SerializeStruct for Wide<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        v: &T,
    ) -> Result<(), S::Error> {
        self.0.serialize_field(key, &Through(v))
    }

    fn skip_field(&mut self, key: &'static str) -> Result<(), S::Error> {
        self.0.skip_field(key)
    }

    fn end(self) -> Result<S::Ok, S::Error> {
        self.0.end()
    }
}

impl<S: ser::SerializeStructVariant> ser::SerializeStructVariant for Wide<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        v: &T,
    ) -> Result<(), S::Error> {
        self.0.serialize_field(key, &Through(v))
    }

    fn skip_field(&mut self, key: &'static str) -> Result<(), S::Error> {
        self.0.skip_field(key)
    }

    fn end(self) -> Result<S::Ok, S::Error> {
        self.0.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Event, Limits, MigrationReport, Phase, Reply, Role};
    use crate::GuestHome;
    use ferry_engine::encode::EncodingCounts;
    use serde_json::Value;

    #[test]
    fn sixty_four_bit_integers_are_strings_and_the_rest_keeps_its_type() {
        let report = MigrationReport {
            role: Role::Source,
            phase: Phase::Copying,
            guest: GuestHome::Migrating,
            to: Some("h:1".into()),
            round: 2,
            bytes_left: u64::MAX,
            wire_bytes: 5,
            dirty_rate_pages_per_sec: 1.5,
            bandwidth_bytes_per_sec: 2.0,
            expected_downtime_ms: 0.25,
            throttle_percent: 40,
            decision: None,
            limits: Limits {
                max_bandwidth: Some(1 << 40),
                ..Limits::default()
            },
            elapsed_ms: 3.0,
            summary: None,
            received: None,
            error: None,
        };
        let v: Value = serde_json::from_str(&to_string(&report).unwrap()).unwrap();
        assert_eq!(v["bytes_left"], "18446744073709551615");
        assert_eq!(v["wire_bytes"], "5");
        assert_eq!(v["limits"]["max_bandwidth"], "1099511627776");
        assert_eq!(v["round"], 2);
        assert_eq!(v["throttle_percent"], 40);
        assert_eq!(v["expected_downtime_ms"], 0.25);
        assert_eq!(v["phase"], "copying");
        assert!(v.get("summary").is_none(), "skipped fields stay skipped");
    }

    #[test]
    fn tagged_and_nested_types_follow_the_rule() {
        let ev = Event::RoundProgress {
            round: 1,
            pages_done: 7,
            pages_total: 9,
            wire_bytes: 1 << 53,
        };
        let v: Value = serde_json::from_str(&to_string(&ev).unwrap()).unwrap();
        assert_eq!(v["event"], "round_progress");
        assert_eq!(v["pages_done"], "7");
        assert_eq!(v["wire_bytes"], "9007199254740992");
        let reply = Reply::Event(Box::new(ev));
        let v: Value = serde_json::from_str(&to_string(&reply).unwrap()).unwrap();
        assert_eq!(
            (v["reply"].as_str(), v["pages_total"].as_str()),
            (Some("event"), Some("9"))
        );
        #[derive(serde::Serialize)]
        struct Summary {
            pages: EncodingCounts,
        }
        let pages = EncodingCounts {
            raw: 123_456,
            ..EncodingCounts::default()
        };
        let v: Value =
            serde_json::from_str(&to_string_pretty(&Summary { pages }).unwrap()).unwrap();
        assert_eq!(v["pages"]["raw"], "123456");
        assert_eq!(v["pages"]["zero"], "0");
        let v: Value = serde_json::from_str(&to_string(&[-1i64, 2]).unwrap()).unwrap();
        assert_eq!(v, serde_json::json!(["-1", "2"]));
    }
}
