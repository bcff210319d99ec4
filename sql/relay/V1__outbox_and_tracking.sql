-- rls-relay's own objects, installed by `rls-relay migrate` (refinery; history in
-- relay.schema_history). Everything lives in schema `relay`, owned by the role that ran
-- the migration. Writers need no privilege here: trigger functions are SECURITY DEFINER
-- with a pinned search_path, so they run as this schema's owner whoever writes.
--
-- Ordering model (why there is an xid column): outbox ids come from a sequence taken
-- before commit, so they commit out of order. The relay reads "what committed between
-- two snapshots" (rows whose xid was running in, or newer than, the previous snapshot),
-- the batch technique of PgQ: nothing that commits late is skipped, and a long-running
-- transaction elsewhere delays nothing.

create schema if not exists relay;
revoke all on schema relay from public;
-- Table owners call relay.track_* from their own migrations and create triggers that
-- execute relay.capture_*: both need the schema to be usable. Nothing in it is readable.
grant usage on schema relay to public;

-- The outbox: one row per event (a row change of a tracked table, per credential) or
-- per visibility announcement ("who may see credential X may have changed").
create table relay.outbox (
    id            bigint generated always as identity primary key,
    -- The writing transaction (top level); the relay's read cursor is a snapshot.
    xid           xid8        not null default pg_current_xact_id(),
    -- Every transaction below this had finished when the row was written. A transaction
    -- that took a lower id and commits after this one has an xid at or above it: the
    -- boundary a resume from this id must look back to.
    written_xmin  xid8        not null default pg_snapshot_xmin(pg_current_snapshot()),
    -- When the row was written: the commit timestamp is used instead when the server
    -- runs with track_commit_timestamp = on.
    written_at    timestamptz not null default clock_timestamp(),
    kind          text        not null check (kind in ('event', 'visibility')),
    table_schema  text        not null,
    table_name    text        not null,
    -- Events only: the protocol's "type", the key that carries the row, the operation.
    event_type    text,
    row_key       text,
    op            text        check (op in ('INSERT', 'UPDATE', 'DELETE')),
    -- Routing key. NULL only for an announcement that concerns every credential.
    credential_id text,
    -- Announcements only: the one user whose visibility changed (the value of the
    -- tracked table's user column, compared with the relay's user claim); NULL: anyone.
    user_id       text,
    new_row       jsonb,
    old_row       jsonb,
    -- Announcements only: pg_current_snapshot() taken while the announcing transaction
    -- commits (relay.stamp_announcement). An event whose transaction is visible in it
    -- committed before the announcement.
    snapshot      pg_snapshot
);
create index outbox_xid_idx on relay.outbox (xid);
revoke all on relay.outbox from public;

-- One row per running relay instance. `idle` tells writers to NOTIFY `channel` when they
-- commit; a busy relay reads the outbox continuously and sets it false, which keeps
-- writers off Postgres' NOTIFY commit lock. Rows not seen for a minute are ignored.
create table relay.listeners (
    instance_id uuid        primary key,
    channel     text        not null,
    idle        boolean     not null,
    seen_at     timestamptz not null default now()
);
revoke all on relay.listeners from public;

-- How far the outbox has been pruned: every id <= pruned_through may be gone, so a
-- client resuming from an older id gets `resume_gap`.
create table relay.retention (
    singleton      boolean primary key default true check (singleton),
    pruned_through bigint  not null default 0
);
insert into relay.retention default values;
revoke all on relay.retention from public;

-- Wakes idle relays, at most once per transaction (Postgres folds identical payloads
-- within a transaction anyway; the GUC spares the lookup). The payload is constant:
-- any login may LISTEN on any channel, so it carries nothing about the data.
create function relay.wake() returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp
as $$
declare
    listening_channel text;
begin
    if current_setting('relay.woken', true) = 'on' then
        return;
    end if;
    perform set_config('relay.woken', 'on', true);
    for listening_channel in
        select distinct channel from relay.listeners
        where idle and seen_at > now() - interval '1 minute'
    loop
        perform pg_notify(listening_channel, 'wake');
    end loop;
end
$$;
revoke all on function relay.wake() from public;

-- Row trigger attached by relay.track_events. Arguments: credential column, event type,
-- row key, and the tracked table's schema and name (a partition reports its parent).
-- Nothing here can fail on a large row: the row goes to a jsonb column, never into the
-- NOTIFY payload.
create function relay.capture_event() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp
as $$
declare
    credential_column constant text := tg_argv[0];
    new_image jsonb;
    old_image jsonb;
    new_credential text;
    old_credential text;
begin
    if tg_op <> 'DELETE' then
        new_image := to_jsonb(new);
        new_credential := new_image ->> credential_column;
    end if;
    if tg_op <> 'INSERT' then
        old_image := to_jsonb(old);
        old_credential := old_image ->> credential_column;
    end if;
    if tg_op = 'UPDATE' and new_image = old_image then
        return null; -- nothing changed: nothing to tell anyone
    end if;

    if tg_op = 'UPDATE' and new_credential is distinct from old_credential then
        -- The row moved to another credential: a removal for the old credential's
        -- viewers, an arrival for the new one's.
        if old_credential is not null then
            insert into relay.outbox (kind, table_schema, table_name, event_type, row_key, op, credential_id, old_row)
            values ('event', tg_argv[3], tg_argv[4], tg_argv[1], tg_argv[2], 'DELETE', old_credential, old_image);
        end if;
        if new_credential is not null then
            insert into relay.outbox (kind, table_schema, table_name, event_type, row_key, op, credential_id, new_row)
            values ('event', tg_argv[3], tg_argv[4], tg_argv[1], tg_argv[2], 'INSERT', new_credential, new_image);
        end if;
    elsif coalesce(new_credential, old_credential) is not null then
        -- A row without a credential is visible to nobody: it produces no event.
        insert into relay.outbox (kind, table_schema, table_name, event_type, row_key, op, credential_id, new_row, old_row)
        values ('event', tg_argv[3], tg_argv[4], tg_argv[1], tg_argv[2], tg_op,
                coalesce(new_credential, old_credential), new_image, old_image);
    else
        return null;
    end if;
    -- Checked here too: a function call with its own settings costs more than a row.
    if current_setting('relay.woken', true) is distinct from 'on' then
        perform relay.wake();
    end if;
    return null;
end
$$;

-- Row trigger attached by relay.track_visibility. Arguments: the credential column and
-- the user column ('' = every credential, every user), schema, table. It writes one
-- announcement per distinct (credential, user) of the old and new row at once; their
-- snapshot is filled in while the transaction commits (relay.stamp_announcement below).
create function relay.capture_visibility() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp
as $$
declare
    credential_column constant text := nullif(tg_argv[0], '');
    user_column constant text := nullif(tg_argv[1], '');
    new_image jsonb;
    old_image jsonb;
    changed record;
begin
    if tg_op <> 'DELETE' then
        new_image := to_jsonb(new);
    end if;
    if tg_op <> 'INSERT' then
        old_image := to_jsonb(old);
    end if;
    if tg_op = 'UPDATE' and new_image = old_image then
        return null;
    end if;
    if credential_column is null and user_column is null then
        perform relay.announce_all_internal(tg_argv[2], tg_argv[3]);
        return null;
    end if;
    for changed in
        select distinct c.credential, c.person from (values
            (new_image ->> credential_column, new_image ->> user_column, new_image is not null),
            (old_image ->> credential_column, old_image ->> user_column, old_image is not null)
        ) as c(credential, person, present)
        where c.present
          -- A row naming no credential (or no user) in a tracked column concerns nobody.
          and (credential_column is null or c.credential is not null)
          and (user_column is null or c.person is not null)
    loop
        insert into relay.outbox (kind, table_schema, table_name, credential_id, user_id)
        values ('visibility', tg_argv[2], tg_argv[3], changed.credential, changed.person);
    end loop;
    perform relay.wake();
    return null;

end
$$;

-- Stamps each announcement with pg_current_snapshot() while its transaction commits (a
-- deferred constraint trigger on the outbox itself, so that the tracked tables carry no
-- deferred trigger events of their own, which would make TRUNCATE fail in the same
-- transaction). The snapshot splits the commit stream as late as Postgres allows: an
-- event whose transaction is visible in it committed before the announcement.
create function relay.stamp_announcement() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp
as $$
begin
    update relay.outbox set snapshot = pg_current_snapshot() where id = new.id;
    return null;
end
$$;
revoke all on function relay.stamp_announcement() from public;

create constraint trigger stamp_announcement after insert on relay.outbox
    deferrable initially deferred for each row
    when (new.kind = 'visibility')
    execute function relay.stamp_announcement();

-- One "everything may have changed" announcement per transaction.
create function relay.announce_all_internal(source_schema text, source_table text) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp
as $$
begin
    if current_setting('relay.announced_all', true) = 'on' then
        return;
    end if;
    perform set_config('relay.announced_all', 'on', true);
    insert into relay.outbox (kind, table_schema, table_name)
    values ('visibility', source_schema, source_table);
    perform relay.wake();
end
$$;
revoke all on function relay.announce_all_internal(text, text) from public;

-- TRUNCATE fires no row trigger: on a table the policies read, it changes everything.
create function relay.capture_visibility_truncate() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp
as $$
begin
    perform relay.announce_all_internal(tg_argv[0], tg_argv[1]);
    return null;
end
$$;

-- For changes no trigger sees (ALTER POLICY, a changed function the policies call):
-- `select relay.announce_visibility_change();` makes every relay forget what it cached.
-- Not granted to PUBLIC: flushing every cache costs one query per connected user.
create function relay.announce_visibility_change() returns void
language sql security definer set search_path = pg_catalog, pg_temp
as $$ select relay.announce_all_internal('relay', 'announce_visibility_change') $$;
revoke all on function relay.announce_visibility_change() from public;

-- Shared argument checks of track_events / track_visibility.
create function relay.tracked_table_name(tbl regclass, out table_schema text, out table_name text)
language plpgsql stable set search_path = pg_catalog, pg_temp
as $$
declare
    kind "char";
begin
    select n.nspname, c.relname, c.relkind into table_schema, table_name, kind
    from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where c.oid = tbl;
    if kind not in ('r', 'p') then
        raise exception 'rls-relay: % is not a table', tbl
            using errcode = 'wrong_object_type',
                  hint = 'Track the table the view reads from.';
    end if;
end
$$;

create function relay.check_column(tbl regclass, column_name name) returns void
language plpgsql stable set search_path = pg_catalog, pg_temp
as $$
begin
    if not exists (
        select 1 from pg_attribute
        where attrelid = tbl and attname = column_name and attnum > 0 and not attisdropped
    ) then
        raise exception 'rls-relay: table % has no column %', tbl, column_name
            using errcode = 'undefined_column';
    end if;
end
$$;

-- Turns each row change of `tbl` into an event of type `event_type` whose row is sent
-- under `row_key`, routed by the value of `credential_column`. Idempotent: calling it
-- again replaces the previous settings. Runs with the caller's rights, so only someone
-- allowed to create triggers on `tbl` (its owner) can track it.
create function relay.track_events(tbl regclass, credential_column name, event_type text, row_key text)
returns void
language plpgsql set search_path = pg_catalog, pg_temp
as $$
declare
    target record;
begin
    target := relay.tracked_table_name(tbl);
    perform relay.check_column(tbl, credential_column);
    if event_type is null or event_type !~ '^[A-Za-z][A-Za-z0-9_.:-]{0,62}$' then
        raise exception 'rls-relay: invalid event_type %', quote_nullable(event_type)
            using errcode = 'invalid_parameter_value',
                  hint = 'A letter followed by up to 62 letters, digits or _ . : -, e.g. position_update.';
    end if;
    if row_key is null or row_key !~ '^[A-Za-z_][A-Za-z0-9_]{0,62}$' then
        raise exception 'rls-relay: invalid row_key %', quote_nullable(row_key)
            using errcode = 'invalid_parameter_value',
                  hint = 'An identifier such as position.';
    end if;
    if row_key in ('type', 'id', 'table', 'schema', 'op', 'credential_id', 'old', 'timestamp') then
        raise exception 'rls-relay: row_key % is a field of every event', row_key
            using errcode = 'invalid_parameter_value';
    end if;
    execute format(
        'create or replace trigger relay_events after insert or update or delete on %s '
        'for each row execute function relay.capture_event(%L, %L, %L, %L, %L)',
        tbl, credential_column, event_type, row_key, target.table_schema, target.table_name);
end
$$;

create function relay.untrack_events(tbl regclass) returns void
language plpgsql set search_path = pg_catalog, pg_temp set client_min_messages = warning
as $$
begin
    execute format('drop trigger if exists relay_events on %s', tbl);
end
$$;

-- Announces "who may see credential <credential_column> may have changed" whenever a
-- row of `tbl` changes (a table the policies read: credentials, memberships, teams).
-- Without a credential column (a team table that maps to many credentials), a change
-- concerns every credential. `columns`, when given, limits UPDATEs that announce to those
-- touching these columns (say, owner_id), so a busy credentials table that only bumps
-- last_synced_at costs nothing. `user_column`, when given, names the one user whose
-- visibility a row decides (a membership's user_id, a credential's owner_id): only that
-- user's cached answer is re-asked, and changes for other users in the same instant are
-- ordered exactly. Give it only when a change of the row can affect no one else; its
-- values are compared with the relay's user claim (RELAY_USER_CLAIM, `sub` by default).
create function relay.track_visibility(
    tbl regclass,
    credential_column name default null,
    columns name[] default null,
    user_column name default null
)
returns void
language plpgsql set search_path = pg_catalog, pg_temp set client_min_messages = warning
as $$
declare
    target record;
    update_clause text := 'update';
    column_name name;
begin
    target := relay.tracked_table_name(tbl);
    if credential_column is not null then
        perform relay.check_column(tbl, credential_column);
    end if;
    if user_column is not null then
        perform relay.check_column(tbl, user_column);
    end if;
    if columns is not null then
        if cardinality(columns) = 0 then
            raise exception 'rls-relay: columns must name at least one column'
                using errcode = 'invalid_parameter_value';
        end if;
        foreach column_name in array columns loop
            perform relay.check_column(tbl, column_name);
        end loop;
        select 'update of ' || string_agg(quote_ident(c), ', ') into update_clause from unnest(columns) c;
    end if;
    execute format(
        'create or replace trigger relay_visibility after insert or delete or %s on %s '
        'for each row execute function relay.capture_visibility(%L, %L, %L, %L)',
        update_clause, tbl, coalesce(credential_column, ''), coalesce(user_column, ''),
        target.table_schema, target.table_name);
    execute format(
        'create or replace trigger relay_visibility_truncate after truncate on %s '
        'for each statement execute function relay.capture_visibility_truncate(%L, %L)',
        tbl, target.table_schema, target.table_name);
end
$$;

create function relay.untrack_visibility(tbl regclass) returns void
language plpgsql set search_path = pg_catalog, pg_temp set client_min_messages = warning
as $$
begin
    execute format('drop trigger if exists relay_visibility on %s', tbl);
    execute format('drop trigger if exists relay_visibility_truncate on %s', tbl);
end
$$;

-- What is tracked, read from the triggers themselves (so no registry can drift from
-- them): used by the relay's audit and to validate subscriptions' table names.
create view relay.tracked as
select t.tgrelid::regclass as tbl,
       case p.proname when 'capture_event' then 'events' else 'visibility' end as kind,
       n.nspname::text as table_schema,
       c.relname::text as table_name,
       nullif(a.args[1], '') as credential_column,
       case p.proname when 'capture_visibility' then nullif(a.args[2], '') end as user_column,
       case p.proname when 'capture_event' then a.args[2] end as event_type,
       case p.proname when 'capture_event' then a.args[3] end as row_key
from pg_trigger t
join pg_proc p on p.oid = t.tgfoid
join pg_namespace pn on pn.oid = p.pronamespace and pn.nspname = 'relay'
join pg_class c on c.oid = t.tgrelid
join pg_namespace n on n.oid = c.relnamespace
cross join lateral (select string_to_array(encode(t.tgargs, 'escape'), '\000') as args) a
where p.proname in ('capture_event', 'capture_visibility')
  and not t.tgisinternal
  -- a partition's clone of its parent's trigger is not tracked on its own
  and t.tgparentid = 0;

grant execute on function relay.track_events(regclass, name, text, text) to public;
grant execute on function relay.untrack_events(regclass) to public;
grant execute on function relay.track_visibility(regclass, name, name[], name) to public;
grant execute on function relay.untrack_visibility(regclass) to public;
grant execute on function relay.tracked_table_name(regclass) to public;
grant execute on function relay.check_column(regclass, name) to public;
