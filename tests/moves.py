"""Watch a store's connection for status and state changes with TEMP triggers, so tests check
what the database really did, not what the code meant to do."""

from sdm_peer import states as st

TABLES = {"experiments": st.EXPERIMENT_TRANSITIONS, "configs": st.CONFIG_TRANSITIONS}
ALLOWED = {table: {(source, target) for sources, targets in transitions.values()
                   for source in sources for target in targets}
           for table, transitions in TABLES.items()}


def watch_moves(conn):
    """Record every (old, new) status of an experiment and state of a config written on `conn`
    (TEMP objects: they live on this connection only and leave the database file alone)."""
    conn.executescript("""
        CREATE TEMP TABLE moves (tbl TEXT NOT NULL, old TEXT NOT NULL, new TEXT NOT NULL);
        CREATE TEMP TRIGGER experiment_moves AFTER UPDATE OF status ON main.experiments
            BEGIN INSERT INTO moves VALUES ('experiments', OLD.status, NEW.status); END;
        CREATE TEMP TRIGGER config_moves AFTER UPDATE OF state ON main.configs
            BEGIN INSERT INTO moves VALUES ('configs', OLD.state, NEW.state); END;
    """)


def take_moves(conn):
    """The moves recorded since the last call, in order, as (table, old, new)."""
    moves = [tuple(row) for row in conn.execute("SELECT tbl, old, new FROM temp.moves ORDER BY rowid")]
    conn.execute("DELETE FROM temp.moves")
    return moves


def illegal(moves):
    return [move for move in moves if move[1:] not in ALLOWED[move[0]]]
