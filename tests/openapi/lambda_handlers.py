"""The Lambda the PetStore definition names (`hello`), as its AWS example writes it."""

import json


def hello(event, context):
    return {"statusCode": 200, "body": json.dumps({"hello": event["requestContext"]["http"]["path"]})}
