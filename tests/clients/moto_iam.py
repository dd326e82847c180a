"""Turns on moto's authentication for tests/store.rs: the first requests (this script's) are
allowed unsigned (INITIAL_NO_AUTH_ACTION_COUNT), then every request must be signed with a key
moto issued. Creates a user with an access key allowed everything, and a bucket; prints the key."""
import json
import sys

import boto3

endpoint, bucket = sys.argv[1], sys.argv[2]
kw = dict(endpoint_url=endpoint, region_name="us-east-1",
          aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="prefixd")
key = iam.create_access_key(UserName="prefixd")["AccessKey"]
allow_all = {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
iam.put_user_policy(UserName="prefixd", PolicyName="all", PolicyDocument=json.dumps(allow_all))
boto3.client("s3", **kw).create_bucket(Bucket=bucket)
print(json.dumps({"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}))
