//! The states and kinds of billing records, as closed sets: code matches on them instead
//! of comparing strings, and the store turns them into (and back from) the names it keeps
//! in its columns, which its CHECK constraints hold to the same sets.

use std::fmt;
use std::str::FromStr;

/// A name that is not one of a set's members.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {set} {value:?}: expected one of {}", expected.join(", "))]
pub struct UnknownName {
    /// The set.
    pub set: &'static str,
    /// What was given.
    pub value: String,
    /// The members' names.
    pub expected: &'static [&'static str],
}

macro_rules! named_set {
    ($(#[$doc:meta])* $name:ident, $set:literal { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every member, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored (and wire) name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownName {
                        set: $set,
                        value: s.to_string(),
                        expected: &[$($text),+],
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named_set!(
    /// Whether a customer's calls are served.
    CustomerStatus, "customer status" {
        /// Served.
        Active = "active",
        /// Refused (unpaid invoices) until paid.
        Suspended = "suspended",
    }
);

named_set!(
    /// An invoice or a credit note.
    InvoiceKind, "invoice kind" {
        /// A cycle's invoice.
        Invoice = "invoice",
        /// A correction of a finalised invoice.
        CreditNote = "credit_note",
    }
);

named_set!(
    /// Where an invoice stands.
    InvoiceStatus, "invoice status" {
        /// Re-rated on every run until finalised; not numbered, not shown to the customer.
        Draft = "draft",
        /// Finalised and numbered; amount due.
        Open = "open",
        /// Paid (or nothing was due).
        Paid = "paid",
        /// Cancelled; its usage is billed again.
        Void = "void",
    }
);

impl InvoiceStatus {
    /// Finalised: numbered and immutable (open or paid).
    pub fn is_final(self) -> bool {
        matches!(self, InvoiceStatus::Open | InvoiceStatus::Paid)
    }
}

named_set!(
    /// What a payment attempt collects or returns.
    PaymentKind, "payment kind" {
        /// An invoice's amount due.
        Invoice = "invoice",
        /// A prepaid top-up.
        TopUp = "top_up",
        /// A credit note's refund.
        Refund = "refund",
    }
);

named_set!(
    /// Where a payment attempt stands.
    PaymentStatus, "payment status" {
        /// Pushed (or about to be); no answer yet.
        Pending = "pending",
        /// Collected.
        Succeeded = "succeeded",
        /// Declined or failed.
        Failed = "failed",
    }
);

named_set!(
    /// A wallet movement.
    MovementKind, "wallet movement kind" {
        /// Credit paid for by the customer.
        Purchased = "purchased",
        /// Credit given by the operator (or an invoice's rebate).
        Granted = "granted",
        /// A call's price.
        Charge = "charge",
    }
);

impl MovementKind {
    /// A credit (anything but a charge).
    pub fn is_credit(self) -> bool {
        self != MovementKind::Charge
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for s in InvoiceStatus::ALL {
            assert_eq!(s.as_str().parse::<InvoiceStatus>(), Ok(*s));
        }
        for k in MovementKind::ALL {
            assert_eq!(k.as_str().parse::<MovementKind>(), Ok(*k));
        }
        let e = "Draft".parse::<InvoiceStatus>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown invoice status \"Draft\": expected one of draft, open, paid, void"
        );
    }
}
