//! Serde structs for every input body, output and nested shape of the model.
//!
//! Members named in the model's `required` list are plain fields; the rest are `Option`s
//! left out of the JSON when `None`. URI labels and query-string members never appear in
//! a body struct: labels live in [`crate::params`], query members in the `…Query`
//! structs next to each list operation.

/// Declares a closed enum of model string values with `as_str`, `ALL`, `Display`,
/// `FromStr` and serde impls. An unknown value fails to deserialize with an
/// AWS-style constraint message naming the value set.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $wire:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in the model's order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The value as the wire spells it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $wire ),+
                }
            }

            /// The value the wire spelling `s` names, if any.
            pub fn from_wire(s: &str) -> Option<Self> {
                match s {
                    $( $wire => Some($name::$variant), )+
                    _ => None,
                }
            }

            /// The AWS constraint text for this value set.
            pub fn constraint() -> String {
                let names: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                format!("Member must satisfy enum value set: [{}]", names.join(", "))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::from_wire(s).ok_or_else(Self::constraint)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::from_wire(&s).ok_or_else(|| serde::de::Error::custom(Self::constraint()))
            }
        }
    };
}

pub mod common;
pub mod image;
pub mod microvm;
pub mod tags;

pub use common::*;
pub use image::*;
pub use microvm::*;
pub use tags::*;

#[cfg(test)]
mod tests;
