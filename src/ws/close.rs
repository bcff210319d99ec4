//! Why a socket is closed, and the close code each reason maps to (protocol v1).

/// Every way the relay ends a WebSocket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// 1001: the relay is shutting down; reconnect (to another instance) and resume.
    ShuttingDown,
    /// 1001: no pong within the deadline; the peer is presumed gone.
    PongTimeout,
    /// 1008: the browser origin is not allowed.
    BadOrigin,
    /// 1009: an inbound message exceeded RELAY_MAX_FRAME_BYTES.
    FrameTooLarge,
    /// 1011: visibility could not be determined; reconnect and resume with `since`.
    VisibilityUnavailable,
    /// 1011: anything else that went wrong on our side.
    Internal,
    /// 4001: no valid token (in time), or a bad one.
    Unauthorized(String),
    /// 4001: the token expired and no fresh `auth` arrived.
    TokenExpired,
    /// 4008: the socket's send queue filled up; resume with `since`.
    SlowConsumer,
    /// 4029: too many connections for this user.
    TooManyConnections,
    /// 4029: too many inbound messages per second.
    TooManyMessages,
}

impl CloseReason {
    pub fn code(&self) -> u16 {
        match self {
            Self::ShuttingDown | Self::PongTimeout => 1001,
            Self::BadOrigin => 1008,
            Self::FrameTooLarge => 1009,
            Self::VisibilityUnavailable | Self::Internal => 1011,
            Self::Unauthorized(_) | Self::TokenExpired => 4001,
            Self::SlowConsumer => 4008,
            Self::TooManyConnections | Self::TooManyMessages => 4029,
        }
    }

    /// The close frame's reason text (at most 123 bytes, as the protocol allows).
    pub fn text(&self) -> String {
        let text = match self {
            Self::ShuttingDown => "server shutting down",
            Self::PongTimeout => "ping timeout",
            Self::BadOrigin => "origin not allowed",
            Self::FrameTooLarge => "message too large",
            Self::VisibilityUnavailable => "visibility unavailable, resume later",
            Self::Internal => "internal error",
            Self::Unauthorized(why) => why.as_str(),
            Self::TokenExpired => "token expired",
            Self::SlowConsumer => "slow consumer",
            Self::TooManyConnections => "too many connections",
            Self::TooManyMessages => "too many messages",
        };
        let mut end = text.len().min(123);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text[..end].to_owned()
    }

    /// A label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::ShuttingDown => "shutdown",
            Self::PongTimeout => "pong_timeout",
            Self::BadOrigin => "bad_origin",
            Self::FrameTooLarge => "frame_too_large",
            Self::VisibilityUnavailable => "visibility_unavailable",
            Self::Internal => "internal",
            Self::Unauthorized(_) => "unauthorized",
            Self::TokenExpired => "token_expired",
            Self::SlowConsumer => "slow_consumer",
            Self::TooManyConnections => "too_many_connections",
            Self::TooManyMessages => "too_many_messages",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_protocol() {
        assert_eq!(CloseReason::ShuttingDown.code(), 1001);
        assert_eq!(CloseReason::BadOrigin.code(), 1008);
        assert_eq!(CloseReason::FrameTooLarge.code(), 1009);
        assert_eq!(CloseReason::TokenExpired.code(), 4001);
        assert_eq!(CloseReason::SlowConsumer.code(), 4008);
        assert_eq!(CloseReason::TooManyMessages.code(), 4029);
    }

    #[test]
    fn reason_texts_fit_a_close_frame() {
        let long = CloseReason::Unauthorized("é".repeat(100));
        assert!(long.text().len() <= 123);
    }
}
