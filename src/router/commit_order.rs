//! Placing events relative to the visibility announcements of the same batch.
//!
//! A batch holds every transaction that committed between two snapshots, without their
//! order. An announcement carries the snapshot taken while its transaction committed, so
//! for each event we know whether it committed before the announcement (its transaction is
//! visible in that snapshot) or after. Only announcements about the event's credential
//! (or every credential), and about the recipient's user (or every user), matter.

use crate::domain::{CredentialId, UserId};
use crate::outbox::event::{Announcement, Event};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Before every relevant announcement: the answer held before the batch applies.
    Before,
    /// After every relevant announcement: the answer as of the batch's end applies.
    After,
    /// Between two relevant announcements (the same user's access to the same credential
    /// changed twice within one read): no answer held is the one of its commit, so the
    /// event is withheld from that user (fail closed) and counted.
    Ambiguous,
}

pub struct AnnouncementPlan<'a> {
    announcements: &'a [Announcement],
}

impl<'a> AnnouncementPlan<'a> {
    pub fn new(announcements: &'a [Announcement]) -> Self {
        Self { announcements }
    }

    /// Whether some announcement may concern `credential` (for some user).
    pub fn mentions(&self, credential: &CredentialId) -> bool {
        self.announcements
            .iter()
            .any(|a| a.credential.as_ref().is_none_or(|c| c == credential))
    }

    /// Whether some announcement may concern `user` (for some credential).
    pub fn concerns(&self, user: Option<&UserId>) -> bool {
        self.announcements
            .iter()
            .any(|a| a.user.is_none() || a.user.as_ref() == user)
    }

    /// Where `event` stands, for a recipient who is `user`.
    pub fn phase(&self, event: &Event, user: Option<&UserId>) -> Phase {
        let relevant = self.announcements.iter().filter(|a| {
            a.credential.as_ref().is_none_or(|c| *c == event.credential)
                && (a.user.is_none() || a.user.as_ref() == user)
        });
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

    fn announcement(
        xid: u64,
        credential: Option<&str>,
        user: Option<&str>,
        snapshot: &str,
    ) -> Announcement {
        Announcement {
            id: EventId(0),
            xid,
            credential: credential.map(CredentialId::from_database),
            user: user.map(UserId::new),
            snapshot: Snapshot::parse(snapshot).expect("valid"),
        }
    }

    fn event(xid: u64, credential: &str) -> Event {
        Event::for_test(1, xid, credential, "positions")
    }

    fn user(name: &str) -> Option<UserId> {
        Some(UserId::new(name))
    }

    #[test]
    fn events_of_other_credentials_are_unaffected() {
        let announcements = [announcement(20, Some("a"), None, "15:20:")];
        let plan = AnnouncementPlan::new(&announcements);
        assert!(!plan.mentions(&CredentialId::from_database("b")));
        assert_eq!(plan.phase(&event(25, "b"), None), Phase::Before);
    }

    #[test]
    fn an_event_committed_before_the_announcement_uses_the_old_answer() {
        let announcements = [announcement(20, Some("a"), None, "15:20:")];
        let plan = AnnouncementPlan::new(&announcements);
        assert_eq!(plan.phase(&event(16, "a"), None), Phase::Before);
    }

    #[test]
    fn an_event_committed_after_or_with_the_announcement_uses_the_new_answer() {
        let announcements = [announcement(20, Some("a"), None, "15:20:17")];
        let plan = AnnouncementPlan::new(&announcements);
        assert_eq!(
            plan.phase(&event(17, "a"), None),
            Phase::After,
            "still running when it committed"
        );
        assert_eq!(
            plan.phase(&event(20, "a"), None),
            Phase::After,
            "the announcing transaction itself"
        );
        assert_eq!(
            plan.phase(&event(21, "a"), None),
            Phase::After,
            "started later"
        );
    }

    #[test]
    fn an_announcement_about_every_credential_orders_every_event() {
        let announcements = [announcement(20, None, None, "15:20:")];
        let plan = AnnouncementPlan::new(&announcements);
        assert!(plan.mentions(&CredentialId::from_database("zzz")));
        assert_eq!(plan.phase(&event(16, "zzz"), None), Phase::Before);
        assert_eq!(plan.phase(&event(22, "zzz"), None), Phase::After);
    }

    #[test]
    fn changes_for_different_users_in_one_read_are_each_exact() {
        // carol revoked (xid 20), then an event (22), then bob granted (xid 30).
        let announcements = [
            announcement(20, Some("s"), Some("carol"), "15:20:"),
            announcement(30, Some("s"), Some("bob"), "25:30:"),
        ];
        let plan = AnnouncementPlan::new(&announcements);
        let between = event(22, "s");
        assert_eq!(plan.phase(&between, user("carol").as_ref()), Phase::After);
        assert_eq!(plan.phase(&between, user("bob").as_ref()), Phase::Before);
        assert_eq!(
            plan.phase(&between, user("alice").as_ref()),
            Phase::Before,
            "alice was never concerned"
        );
        assert!(plan.concerns(user("bob").as_ref()) && !plan.concerns(user("alice").as_ref()));
    }

    #[test]
    fn an_event_between_two_changes_for_the_same_user_is_ambiguous() {
        let announcements = [
            announcement(20, Some("a"), Some("bob"), "15:20:"),
            announcement(30, Some("a"), Some("bob"), "25:30:"),
        ];
        let plan = AnnouncementPlan::new(&announcements);
        assert_eq!(
            plan.phase(&event(22, "a"), user("bob").as_ref()),
            Phase::Ambiguous
        );
        assert_eq!(
            plan.phase(&event(16, "a"), user("bob").as_ref()),
            Phase::Before
        );
        assert_eq!(
            plan.phase(&event(31, "a"), user("bob").as_ref()),
            Phase::After
        );
    }
}
