//! Placing events relative to the visibility announcements of the same batch.
//!
//! A batch holds every transaction that committed between two snapshots, without their
//! order. An announcement carries the snapshot taken while its transaction committed, so
//! for each event we know whether it committed before the announcement (its transaction is
//! visible in that snapshot) or after. Only announcements about the event's credential
//! (or about every credential) matter.

use std::collections::HashMap;

use crate::domain::CredentialId;
use crate::outbox::event::{Announcement, Event};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Before every relevant announcement: route with the answers held before the batch.
    Before,
    /// After every relevant announcement: route with the answers as of the batch's end.
    After,
    /// Between two announcements about its credential that overlapped: no answer held is
    /// the one of its commit, so it is delivered to no one (fail closed) and counted.
    Ambiguous,
}

pub struct AnnouncementPlan<'a> {
    everything: Vec<&'a Announcement>,
    by_credential: HashMap<&'a CredentialId, Vec<&'a Announcement>>,
}

impl<'a> AnnouncementPlan<'a> {
    pub fn new(announcements: &'a [Announcement]) -> Self {
        let mut plan = Self {
            everything: Vec::new(),
            by_credential: HashMap::new(),
        };
        for announcement in announcements {
            match &announcement.credential {
                None => plan.everything.push(announcement),
                Some(credential) => plan
                    .by_credential
                    .entry(credential)
                    .or_default()
                    .push(announcement),
            }
        }
        plan
    }

    pub fn is_empty(&self) -> bool {
        self.everything.is_empty() && self.by_credential.is_empty()
    }

    /// Credentials named by the announcements; `None` when one is about every credential.
    pub fn touched(&self) -> Option<Vec<&'a CredentialId>> {
        self.everything
            .is_empty()
            .then(|| self.by_credential.keys().copied().collect())
    }

    pub fn phase(&self, event: &Event) -> Phase {
        let relevant = self.everything.iter().chain(
            self.by_credential
                .get(&event.credential)
                .into_iter()
                .flatten(),
        );
        let (mut before, mut after) = (false, false);
        for announcement in relevant {
            if announcement.saw_commit_of(event) {
                before = true;
            } else {
                after = true;
            }
        }
        match (before, after) {
            (_, false) => Phase::Before,
            (false, true) => Phase::After,
            (true, true) => Phase::Ambiguous,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::snapshot::Snapshot;
    use crate::domain::EventId;
    use crate::outbox::event::{EventRow, TableNames};

    fn announcement(xid: u64, credential: Option<&str>, snapshot: &str) -> Announcement {
        Announcement {
            id: EventId(0),
            xid,
            credential: credential.map(CredentialId::from_database),
            snapshot: Snapshot::parse(snapshot).expect("valid"),
        }
    }

    fn event(xid: u64, credential: &str) -> Event {
        let xid = xid.to_string();
        Event::decode(
            &EventRow {
                id: 1,
                xid: &xid,
                table_schema: "public",
                table_name: "positions",
                event_type: "position_update",
                row_key: "position",
                op: "INSERT",
                credential_id: credential,
                new_row: Some("{}"),
                old_row: None,
                committed_at_micros: 0,
            },
            &mut TableNames::default(),
        )
        .expect("valid")
    }

    #[test]
    fn events_of_other_credentials_are_unaffected() {
        let announcements = [announcement(20, Some("a"), "15:20:")];
        let plan = AnnouncementPlan::new(&announcements);
        assert_eq!(plan.phase(&event(25, "b")), Phase::Before);
    }

    #[test]
    fn an_event_committed_before_the_announcement_uses_the_old_answer() {
        let announcements = [announcement(20, Some("a"), "15:20:")];
        let plan = AnnouncementPlan::new(&announcements);
        assert_eq!(plan.phase(&event(16, "a")), Phase::Before);
    }

    #[test]
    fn an_event_committed_after_or_with_the_announcement_uses_the_new_answer() {
        let announcements = [announcement(20, Some("a"), "15:20:17")];
        let plan = AnnouncementPlan::new(&announcements);
        assert_eq!(
            plan.phase(&event(17, "a")),
            Phase::After,
            "still running when it committed"
        );
        assert_eq!(
            plan.phase(&event(20, "a")),
            Phase::After,
            "the announcing transaction itself"
        );
        assert_eq!(plan.phase(&event(21, "a")), Phase::After, "started later");
    }

    #[test]
    fn an_announcement_about_every_credential_orders_every_event() {
        let announcements = [announcement(20, None, "15:20:")];
        let plan = AnnouncementPlan::new(&announcements);
        assert_eq!(plan.touched(), None);
        assert_eq!(plan.phase(&event(16, "zzz")), Phase::Before);
        assert_eq!(plan.phase(&event(22, "zzz")), Phase::After);
    }

    #[test]
    fn an_event_between_two_announcements_of_its_credential_is_ambiguous() {
        let announcements = [
            announcement(20, Some("a"), "15:20:"),
            announcement(30, Some("a"), "25:30:"),
        ];
        let plan = AnnouncementPlan::new(&announcements);
        assert_eq!(plan.phase(&event(22, "a")), Phase::Ambiguous);
        assert_eq!(plan.phase(&event(16, "a")), Phase::Before);
        assert_eq!(plan.phase(&event(31, "a")), Phase::After);
    }
}
