from prefect import flow


def test_a_flow_runs_against_the_session_server(prefect_server):
    @flow
    def hello() -> str:
        return "hi"

    assert hello() == "hi"
