-- The example trading schema: the shape of the multi-tenant app rls-relay was built for.
-- Not one of the relay's migrations: `rls-relay demo` and the tests apply it after
-- `rls-relay migrate`, the way an application's own migrations would.
--
-- Users own broker credentials and may share one with another user (an advisor) through
-- credential_members. Positions, orders and balances belong to a credential. The REST
-- API connects as `app_user` (NOLOGIN, NOBYPASSRLS) with the caller's JWT claims in
-- request.jwt.claims (the PostgREST/Supabase convention); RLS decides the rest.

do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'app_user') then
        create role app_user nologin nobypassrls;
    end if;
end
$$;

create schema if not exists app;
grant usage on schema app to app_user;

-- The caller's user id from the JWT claims; NULL (sees nothing) when there are none.
create function app.current_user_id() returns text
language sql stable
as $$ select nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub' $$;
grant execute on function app.current_user_id() to app_user;

create table public.users (
    id           text primary key,
    display_name text not null
);

create table public.credentials (
    id         uuid primary key default gen_random_uuid(),
    owner_id   text not null references public.users (id),
    broker     text not null default 'alpaca',
    label      text not null,
    created_at timestamptz not null default now()
);

create table public.credential_members (
    credential_id uuid not null references public.credentials (id) on delete cascade,
    user_id       text not null references public.users (id),
    role          text not null default 'viewer',
    primary key (credential_id, user_id)
);

create table public.positions (
    id            bigint generated always as identity primary key,
    credential_id uuid    not null references public.credentials (id) on delete cascade,
    symbol        text    not null,
    qty           numeric not null,
    avg_price     numeric not null,
    market_value  numeric not null default 0,
    updated_at    timestamptz not null default now(),
    unique (credential_id, symbol)
);

create table public.orders (
    id            bigint generated always as identity primary key,
    credential_id uuid    not null references public.credentials (id) on delete cascade,
    symbol        text    not null,
    side          text    not null check (side in ('buy', 'sell')),
    qty           numeric not null,
    filled_qty    numeric not null default 0,
    limit_price   numeric,
    status        text    not null default 'new',
    updated_at    timestamptz not null default now()
);

create table public.balances (
    credential_id uuid primary key references public.credentials (id) on delete cascade,
    cash          numeric not null default 0,
    equity        numeric not null default 0,
    buying_power  numeric not null default 0,
    updated_at    timestamptz not null default now()
);

alter table public.users              enable row level security, force row level security;
alter table public.credentials        enable row level security, force row level security;
alter table public.credential_members enable row level security, force row level security;
alter table public.positions          enable row level security, force row level security;
alter table public.orders             enable row level security, force row level security;
alter table public.balances           enable row level security, force row level security;

create policy users_self on public.users
    using (id = app.current_user_id());

-- A member sees their own memberships (not the other members of a credential: that
-- would make this policy and the next one read each other).
create policy members_self on public.credential_members
    using (user_id = app.current_user_id());

create policy credentials_owner_or_member on public.credentials
    using (owner_id = app.current_user_id()
           or exists (select 1 from public.credential_members m
                      where m.credential_id = credentials.id
                        and m.user_id = app.current_user_id()));

-- Everything else is visible exactly when its credential is.
create policy positions_by_credential on public.positions
    using (credential_id in (select id from public.credentials));
create policy orders_by_credential on public.orders
    using (credential_id in (select id from public.credentials));
create policy balances_by_credential on public.balances
    using (credential_id in (select id from public.credentials));

grant select on public.users, public.credentials, public.credential_members to app_user;
grant select, insert, update, delete on public.positions, public.orders, public.balances to app_user;

select relay.track_events('public.positions', 'credential_id', 'position_update', 'position');
select relay.track_events('public.orders', 'credential_id', 'order_update', 'order');
select relay.track_events('public.balances', 'credential_id', 'balance_update', 'balance');
-- Who sees a credential depends on its owner and its members: announce those changes,
-- each for the one user it concerns (a credential's members lose it through the
-- cascade on credential_members, which announces them).
select relay.track_visibility('public.credentials', 'id', array['owner_id'], user_column => 'owner_id');
select relay.track_visibility('public.credential_members', 'credential_id', user_column => 'user_id');
